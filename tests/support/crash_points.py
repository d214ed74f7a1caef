"""The kill -9 scenarios that live outside tests/test_crash.py's table, by edge: the
crash-at-every-edge meta-test counts them as covered. Data only; no fixtures, no processes."""

from __future__ import annotations

# (scope, trigger, source) of the edges whose crash scenario is in tests/test_operator_crash.py.
CRASH_TESTED_ELSEWHERE = frozenset({("order", "resolve", "needs_attention")})
