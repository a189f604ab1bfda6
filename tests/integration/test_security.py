"""Security: TLS and SASL (SCRAM) reach every Kafka client, against the embedded broker
with a SASL_SSL listener and certificates made by the test; model files load only in a
safe format or with an explicit trust flag; nothing from a topic is unpickled or evaluated.

The clients are given only the SASL_SSL listener's address, so a client that dropped the
security settings could not connect at all."""

from __future__ import annotations

import ast
import pickle
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from models import registry
from models.training import digits_split
from streams import topics
from streams.broker.secure import SCRAM_MECHANISM, SecureEmbeddedBroker, make_certificates
from streams.config import Settings
from streams.replay import replay
from streams.sdk import Client, PredictionReader, Predictor
from tests.integration.helpers import collect, wait_until_serving

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "clipstream", "scram-secret-for-tests"
MODEL = "digits-logreg"


@pytest.fixture(scope="module")
def kafka_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Overrides the shared fixture: the broker also listens with SASL_SSL, and these
    settings (which the ``processes`` fixture uses) point at that listener only."""
    certs = make_certificates(tmp_path_factory.mktemp("certs"))
    broker = SecureEmbeddedBroker(
        certs, {USER: PASSWORD}, data_dir=tmp_path_factory.mktemp("kafka-secure")
    )
    broker.start()
    try:
        settings = Settings(
            bootstrap=broker.secure_bootstrap,
            partitions=4,
            replica_partitions=4,
            security_protocol="SASL_SSL",
            sasl_mechanism=SCRAM_MECHANISM,
            sasl_username=USER,
            sasl_password=PASSWORD,
            ssl_cafile=str(certs.ca_pem),
        )
        topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
        yield settings
    finally:
        broker.stop()


def security_env(s: Settings) -> dict[str, str]:
    return {
        "CLIPSTREAM_SECURITY_PROTOCOL": s.security_protocol,
        "CLIPSTREAM_SASL_MECHANISM": s.sasl_mechanism or "",
        "CLIPSTREAM_SASL_USERNAME": s.sasl_username or "",
        "CLIPSTREAM_SASL_PASSWORD": s.sasl_password or "",
        "CLIPSTREAM_SSL_CAFILE": s.ssl_cafile or "",
        "PYTHONPATH": str(ROOT),
    }


def test_every_client_serves_over_sasl_ssl(kafka_settings, digits_models, processes, tmp_path):
    s = kafka_settings
    # registry (confluent producer, consumer and admin client)
    registry.deploy_model(s, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    pickled = tmp_path / "logreg.pkl"
    pickled.write_bytes(pickle.dumps(object()))  # never loaded: the replica refuses pickle
    registry.deploy_model(s, "pickled", str(pickled), fmt="pickle", input_dim=64)
    registry.register_app(s, "secure", [MODEL], deadline_ms=10_000, default_label="0")
    registry.register_app(s, "pickled", ["pickled"], deadline_ms=10_000, default_label="p")
    env = security_env(s)
    # worker (Faust over aiokafka, plus its confluent producer and admin) and replicas
    processes("worker", "worker", env=env)
    processes("replica", "replica", "--model", MODEL, env=env)
    processes("replica-pickled", "replica", "--model", "pickled", env=env)
    # the SDK: producer, reader and request/response predictor
    client, reader = Client(s), PredictionReader(s)
    _, X, _, y = digits_split()
    first = wait_until_serving(client, reader, "secure", X[0].tolist())
    assert first["error"] is None and first["label"] == str(y[0])

    qids = {
        client.send_query("secure", x.tolist()): str(label)
        for x, label in zip(X[:30], y[:30], strict=True)
    }
    refused = client.send_query("pickled", X[0].tolist())
    client.flush()
    got = collect(reader, {*qids, refused}, timeout=60)
    assert set(qids) <= set(got)
    assert sum(got[q][0]["label"] == label for q, label in qids.items()) >= 27
    # pickle is not loaded without the trust flag; the query gets the default and the reason
    assert got[refused][0]["default"] and "refusing to load" in got[refused][0]["error"]
    with Predictor(s) as predictor:
        answer = predictor.predict("secure", X[1].tolist(), timeout=60)
    assert answer["label"] == str(y[1])

    # feedback and replay (confluent consumers and producer) over the same listener
    for q, label in qids.items():
        client.send_feedback(q, "secure", label=label)
    client.flush()
    states, counts = replay(s, "secure", dry_run=True)
    assert "secure" in states and sum(counts.values()) >= len(qids), counts


def test_wrong_credentials_are_refused(kafka_settings):
    wrong = Settings(**{**kafka_settings.__dict__, "sasl_password": "not-the-password"})
    with pytest.raises(Exception, match=r"(?i)fail|timed out|transport"):
        AdminClient(wrong.kafka(log_level=0)).list_topics(timeout=10)
    client = Client(wrong, **{"message.timeout.ms": 5000, "log_level": 0})
    outcome: list = []
    client.producer.produce(topics.QUERIES, b"x", on_delivery=lambda err, _m: outcome.append(err))
    client.producer.flush(20)
    assert outcome and outcome[0] is not None, "delivered with a wrong password"
    # a client without TLS cannot talk to the SASL_SSL listener either
    plain = Settings(bootstrap=kafka_settings.bootstrap)
    with pytest.raises(Exception, match=r"(?i)fail|timed out|transport"):
        AdminClient(plain.kafka(log_level=0)).list_topics(timeout=10)


def test_faust_gets_the_same_credentials(kafka_settings):
    creds = kafka_settings.faust_broker_credentials()
    assert creds.username == USER and creds.password == PASSWORD
    assert (
        str(creds.mechanism.value if hasattr(creds.mechanism, "value") else creds.mechanism)
        == SCRAM_MECHANISM
    )
    assert creds.ssl_context is not None and creds.ssl_context.verify_mode.name == "CERT_REQUIRED"
    assert (
        str(creds.protocol.value if hasattr(creds.protocol, "value") else creds.protocol)
        == "SASL_SSL"
    )


# -- nothing from a topic is ever unpickled or evaluated -------------------------------------

UNSAFE_CALLS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("marshal", "load"),
    ("marshal", "loads"),
    ("joblib", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "loads"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("shelve", "open"),
}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}


def unsafe_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        if isinstance(fn, ast.Name) and fn.id in UNSAFE_BUILTINS:
            found.append(fn.id)
        elif (
            isinstance(fn, ast.Attribute)
            and isinstance(fn.value, ast.Name)
            and (fn.value.id, fn.attr) in UNSAFE_CALLS
        ):
            found.append(f"{fn.value.id}.{fn.attr}")
        if any(k.arg == "allow_pickle" and getattr(k.value, "value", False) for k in node.keywords):
            found.append("allow_pickle=True")
    return found


def test_nothing_from_a_topic_is_unpickled_or_evaluated():
    uses = {
        str(path.relative_to(ROOT)): found
        for package in ("streams", "models", "selection")
        for path in sorted((ROOT / package).rglob("*.py"))
        if (found := unsafe_uses(path))
    }
    # the one place: a model file an operator named, behind the explicit trust flag
    assert uses == {"models/files.py": ["joblib.load"]}, uses
    source = (ROOT / "models" / "files.py").read_text()
    guard, load = source.index("if not trust_pickle"), source.index("joblib.load(")
    assert guard < load
