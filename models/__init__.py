"""clipstream's model abstraction layer: adapters, safe model files, batching, the
prediction cache, the registry and the replica runtime. No Faust imports here."""
