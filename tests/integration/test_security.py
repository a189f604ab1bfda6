"""Security: TLS and SASL (SCRAM) reach every Kafka client, against the embedded broker
with a SASL_SSL listener and certificates made by the test; model files load only in a
safe format or with an explicit trust flag; nothing from a topic is unpickled or evaluated;
the REST gateway serves HTTPS only, with a certificate made by the test, and answers only
requests with a bearer token scoped to the app and operation (401 without, 403 outside).

The clients are given only the SASL_SSL listener's address, so a client that dropped the
security settings could not connect at all."""

from __future__ import annotations

import ast
import http.client
import json
import pickle
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.models.training import digits_split
from clipstream.streams.broker.secure import (
    SCRAM_MECHANISM,
    SecureEmbeddedBroker,
    make_certificates,
)
from clipstream.streams.learning.replay import replay
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.runtime.processes import clipstream_command
from clipstream.streams.sdk import Client, PredictionReader, Predictor
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from tests.conftest import wait_for
from tests.integration.helpers import collect, learnt_everything, wait_until_serving

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
    registry.register_app(
        s, "secure", [MODEL], policy="EXP4", deadline_ms=10_000, default_label="0"
    )
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
    # joined to their answers and folded into the selection state by the serving loops
    wait_for(lambda: learnt_everything(s), 60, "every feedback record applied")
    states, counts = replay(s, "secure", dry_run=True)
    assert "secure" in states and counts["applied"] == len(qids), counts


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


# -- the REST gateway: bearer tokens over HTTPS --------------------------------------------


def pem_pair(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 (made with cryptography), as the PEM files
    the gateway reads: (CA, certificate, key)."""
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        pkcs12,
    )

    certs = make_certificates(directory)
    key, cert, _ = pkcs12.load_key_and_certificates(
        certs.keystore.read_bytes(), certs.keystore_password.encode()
    )
    assert key is not None and cert is not None
    certfile, keyfile = directory / "gateway.pem", directory / "gateway-key.pem"
    certfile.write_bytes(cert.public_bytes(Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    keyfile.chmod(0o600)
    return certs.ca_pem, certfile, keyfile


def call(
    url: str, body: object, token: str | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict, dict]:
    """POST JSON; (status, JSON body, headers), also for 4xx answers."""
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def new_token(tokens: Path, *scopes: str, name: str) -> str:
    """A token made with the CLI as an operator would; its hash is appended to ``tokens``."""
    args = [a for scope in scopes for a in ("--app", scope)]
    done = subprocess.run(
        clipstream_command("gateway", "token", *args, "--name", name, "--tokens-file", str(tokens)),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_the_gateway_needs_a_scoped_token_over_https(
    kafka_settings, digits_models, processes, tmp_path
):
    s = kafka_settings
    if registry.current(s).version_spec(MODEL) is None:
        registry.deploy_model(s, MODEL, str(digits_models[MODEL][0]), input_dim=64)
    for app in ("rest-secure", "rest-other"):
        registry.register_app(s, app, [MODEL], deadline_ms=10_000, default_label="0")
    ca, certfile, keyfile = pem_pair(tmp_path / "gateway-certs")
    tokens = tmp_path / "tokens"
    client_token = new_token(tokens, "rest-secure", name="app-client")
    labeller = new_token(tokens, "rest-secure:feedback", name="labeller")
    assert client_token not in tokens.read_text() and labeller not in tokens.read_text()

    port = free_port()
    env = {
        **security_env(s),
        "CLIPSTREAM_GATEWAY_TOKENS_FILE": str(tokens),
        "CLIPSTREAM_GATEWAY_CERTFILE": str(certfile),
        "CLIPSTREAM_GATEWAY_KEYFILE": str(keyfile),
    }
    worker = processes("worker", "worker", "--web-port", str(port), env=env)
    processes("replica", "replica", "--model", MODEL, env=env)
    trusted = ssl.create_default_context(cafile=str(ca))
    base = f"https://127.0.0.1:{port}/apps"
    _, X, _, y = digits_split()
    features = {"features": X[0].tolist()}

    def answered() -> dict | None:
        try:
            status, body, _ = call(f"{base}/rest-secure/predict", features, client_token, trusted)
        except OSError:  # the web server starts once the worker has its partitions
            return None
        assert status == 200, body
        return None if body["default"] else body

    first = wait_for(answered, 120, "a model's answer over HTTPS with a valid token")
    assert first["label"] == str(y[0]) and first["models"] == [f"{MODEL}@1"]
    assert f"REST gateway on :{port} (https, bearer tokens: 2)" in worker.log_path.read_text()

    # no token, a made-up token: 401 with the Bearer challenge
    for token in (None, "cs_not-a-token"):
        status, body, headers = call(f"{base}/rest-secure/predict", features, token, trusted)
        assert status == 401, body
        assert headers["WWW-Authenticate"].startswith('Bearer realm="clipstream"')
    # a valid token outside its scope: 403, also for an app that does not exist (no probing)
    for url, token in [
        (f"{base}/rest-other/predict", client_token),
        (f"{base}/no-such-app/predict", client_token),
        (f"{base}/rest-secure/predict", labeller),  # may only send feedback
    ]:
        status, body, headers = call(url, features, token, trusted)
        assert status == 403, (url, body)
        assert 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    status, body, _ = call(
        f"{base}/rest-secure/feedback",
        {"query_id": first["query_id"], "label": int(y[0])},
        labeller,
        trusted,
    )
    assert (status, body["accepted"]) == (202, True)

    # HTTPS only: plain HTTP and a client that does not trust the certificate get nothing
    with pytest.raises((OSError, http.client.HTTPException)):
        call(f"http://127.0.0.1:{port}/apps/rest-secure/predict", features, client_token)
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        call(f"{base}/rest-secure/predict", features, client_token, ssl.create_default_context())

    # tokens are added and revoked by editing the file, without a restart
    late = new_token(tokens, "*:predict", name="late")
    tokens.write_text(
        "\n".join(line for line in tokens.read_text().splitlines() if "labeller" not in line) + "\n"
    )

    def rotated() -> bool:
        new = call(f"{base}/rest-other/predict", features, late, trusted)[0]
        old = call(
            f"{base}/rest-secure/feedback", {"query_id": "q", "label": 1}, labeller, trusted
        )[0]
        return (new, old) == (200, 401)

    wait_for(rotated, 30, "the new token accepted and the revoked one refused", interval=0.5)


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
