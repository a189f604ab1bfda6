"""Integrations for users' apps built on stream frameworks: Faust (``integrations.faust``)."""
