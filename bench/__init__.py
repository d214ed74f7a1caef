"""`make bench`: every figure of issue 8 §5 in one run, each beside its raw reference.

Run `python -m bench` (add `--quick` to check the harness with small counts). Each module
measures one thing and returns `Row`s; `bench.__main__` prints them as one markdown table.
Only `bench.engine_api` touches the engine's Python API; everything else talks to the
schema, the `order-saga` command or the HTTP API.
"""
