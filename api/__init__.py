"""The orchestrator's HTTP API: translates HTTP to fsm calls and back."""
