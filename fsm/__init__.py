"""The saga engine: state machines, persistence, executor, recovery. Imports nothing from api."""
