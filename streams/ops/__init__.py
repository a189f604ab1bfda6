"""Operator tools: the command line, status, the demo, and what a failed command says."""
