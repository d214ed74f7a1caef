"""The composition root of order-saga: the `order-saga` console script, which wires the
engine (`fsm`), the HTTP API (`api`) and the reference services (`downstream`) together.
Nothing in `fsm` imports this package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("order-saga")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
