"""The `order-saga` console script: serves the HTTP API (`api`) and the reference services
(`downstream`), and drives the engine (`fsm`) from a shell. It never builds the engine:
`fsm.wiring.open_saga` does. Nothing in `fsm` or `api` imports this package."""

from __future__ import annotations


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed metadata when first asked for: every
    `order-saga` process imports this package, few print the version (importlib.metadata
    costs ~25 ms)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("order-saga")
    except PackageNotFoundError:  # running from a source tree that was never installed
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
