"""The saga engine: state machines, persistence, executor, recovery, wiring.

It imports nothing from `api`, `downstream` or `order_saga`: those compose it (the console
script in order_saga/cli.py, the HTTP app in api/), never the other way round."""
