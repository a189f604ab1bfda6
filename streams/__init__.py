"""clipstream's Kafka side, a folder per role: ``wire`` (what the thin SDK may import),
``sdk``, ``worker``, ``learning``, ``gateway``, ``ops`` (CLI, status, demo), ``runtime``,
``broker`` (the embedded dev broker) and ``bench``."""
