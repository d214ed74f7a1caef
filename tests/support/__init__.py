"""Test helpers (no fixtures): services.py, processes.py, database.py, api.py, crash_points.py."""
