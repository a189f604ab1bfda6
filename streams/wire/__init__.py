"""The wire core: Avro codec, topic names, settings, Kafka client helpers, shared bounds and
the sensor hooks. The thin SDK imports only this package (tests/unit/test_layout.py)."""
