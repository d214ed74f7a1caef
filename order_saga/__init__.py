"""The `order-saga` console script: serves the HTTP API (`api`) and the reference services
(`downstream`), and drives the engine (`fsm`) from a shell. It never builds the engine:
`fsm.wiring.open_saga` does. Nothing in `fsm` or `api` imports this package."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("order-saga")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
