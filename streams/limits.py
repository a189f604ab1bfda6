"""Bounds that every entry point applies alike (worker, REST gateway, SDK)."""

#: the longest deadline a query may ask for: its pending state is held that long
MAX_DEADLINE_MS = 600_000
