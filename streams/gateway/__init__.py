"""The worker's REST gateway: routes over Kafka, and who may call them."""
