"""What every long-running process has: Prometheus metrics, garbage-collector settings, and
the child processes the demo, bench and tests start."""
