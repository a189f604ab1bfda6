"""Model artifacts over a real broker: a model deployed from one directory, its file then
removed, is served by a replica started in another directory with an empty cache (a host
without the deployer's files); a 100 MB file is chunked and reassembled; a chunk that was
tampered with is refused with the reason; the registry records digest and size."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from clipstream.models.control import artifacts, registry
from clipstream.models.control.artifacts import ArtifactError
from clipstream.models.files import load_model
from clipstream.models.replica import Replica
from clipstream.models.training import digits_split
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import codec
from clipstream.streams.wire.config import Settings
from tests.integration.helpers import collect, wait_until_serving

pytestmark = pytest.mark.integration


def cli(settings: Settings, cwd: Path, *args: str) -> str:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "COLUMNS": "250",  # rich tables: one line per model
    }
    done = subprocess.run(
        clipstream_command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture
def elsewhere(kafka_settings: Settings, tmp_path: Path) -> Iterator[Callable[..., Child]]:
    """Start clipstream processes in a working directory of the test's choice; all are
    stopped at the end, also when the test fails."""
    started: list[Child] = []

    def start(name: str, cwd: Path, *args: str, env: dict[str, str]) -> Child:
        command = f"cd {shlex.quote(str(cwd))} && exec {shlex.join(clipstream_command(*args))}"
        full_env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_settings.require_bootstrap(), **env}
        child = spawn(name, ["sh", "-c", command], tmp_path / "logs", full_env)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()
        if os.environ.get("CLIPSTREAM_TEST_LOGS"):
            print(f"--- {child.name} ---\n{child.log_tail(60)}")


def test_a_replica_on_another_host_serves_a_deployed_and_removed_file(
    kafka_settings, digits_models, processes, elsewhere, tmp_path
) -> None:
    s = kafka_settings
    deployer, host = tmp_path / "deployer", tmp_path / "replica-host"
    deployer.mkdir()
    host.mkdir()
    shutil.copy(digits_models["digits-logreg"][0], deployer / "logreg.skops")
    shutil.copy(digits_models["digits-forest"][0], deployer / "forest.skops")
    forest = load_model(deployer / "forest.skops")

    # the commands as an operator types them, with paths relative to where they stand
    convert = "from clipstream.models.files import load_model as l, save_onnx as s; "
    convert += "s(l('forest.skops'), 'forest.onnx', 64)"
    subprocess.run([sys.executable, "-c", convert], cwd=deployer, check=True, timeout=120)
    files = {n: (deployer / n).read_bytes() for n in ("logreg.skops", "forest.onnx")}
    out = cli(s, deployer, "model", "deploy", "logreg", "logreg.skops", "--input-dim", "64")
    digest = hashlib.sha256(files["logreg.skops"]).hexdigest()
    assert (
        out.strip() == f"logreg v1 serving (sha256 {digest}, {len(files['logreg.skops']):,} bytes)"
    )
    cli(
        s,
        deployer,
        "model",
        "deploy",
        "forest",
        "forest.onnx",
        "--format",
        "onnx",
        "--input-dim",
        "64",
    )
    listed = cli(s, deployer, "model", "list")
    for name, data in files.items():
        row = next(line for line in listed.splitlines() if name.split(".")[0] in line.split())
        assert hashlib.sha256(data).hexdigest()[:12] in row and f"{len(data):,}" in row, row
        assert "clipstream.artifacts" in row
    versions = json.loads(cli(s, deployer, "model", "list", "--json"))["models"]
    onnx_version = versions["forest"]["versions"][0]
    assert onnx_version["format"] == "onnx" and onnx_version["size"] == len(files["forest.onnx"])
    assert onnx_version["path"] == str(deployer / "forest.onnx")
    shutil.rmtree(deployer)  # nothing of the deployer's disk is left

    registry.register_app(s, "by-logreg", ["logreg"], deadline_ms=30_000)
    registry.register_app(s, "by-forest", ["forest"], deadline_ms=30_000)
    processes("worker", "worker")
    env = {"CLIPSTREAM_ARTIFACT_CACHE": str(host / "cache")}
    for model in ("logreg", "forest"):
        elsewhere(f"replica-{model}", host, "replica", "--model", model, env=env)
    client, reader = Client(s), PredictionReader(s)
    _, X, _, _ = digits_split()
    wait_until_serving(client, reader, "by-logreg", X[0].tolist())
    wait_until_serving(client, reader, "by-forest", X[0].tolist())

    asked = {
        app: {client.send_query(app, x.tolist()): i for i, x in enumerate(X[:60])}
        for app in ("by-logreg", "by-forest")
    }
    client.flush()
    got = collect(reader, set(asked["by-logreg"]) | set(asked["by-forest"]), timeout=60)
    reference = {
        "by-logreg": load_model(digits_models["digits-logreg"][0]).predict(X[:60]),
        "by-forest": forest.predict(X[:60]),
    }
    for app, model in (("by-logreg", "logreg"), ("by-forest", "forest")):
        answers = [got[q][0] for q in asked[app]]
        assert all(a["error"] is None and a["models"] == [f"{model}@1"] for a in answers), app
        same = sum(
            a["label"] == str(reference[app][i])
            for a, i in zip(answers, asked[app].values(), strict=True)
        )
        assert same >= 59, (app, same)  # the ONNX graph computes in float32
    cached = sorted(p.name for p in (host / "cache").iterdir())
    assert cached == sorted(hashlib.sha256(d).hexdigest() for d in files.values())


def end_offset(settings: Settings) -> int:
    consumer = Consumer(settings.kafka(**{"group.id": "offsets"}))
    try:
        return consumer.get_watermark_offsets(TopicPartition(artifacts.ARTIFACTS, 0), timeout=10)[1]
    finally:
        consumer.close()


def test_a_100_mb_file_is_chunked_and_reassembled(kafka_settings, tmp_path) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(25):
            f.write(os.urandom(4 << 20))
    started = time.perf_counter()
    stored = artifacts.upload(kafka_settings, big)
    uploaded = time.perf_counter() - started
    assert stored["size"] == 100 << 20 and stored["artifact"]["chunks"] == 200
    host = Settings(bootstrap=kafka_settings.bootstrap, artifact_cache=str(tmp_path / "cache"))
    started = time.perf_counter()
    got = artifacts.fetch(host, {"path": str(big), **stored})
    fetched = time.perf_counter() - started
    with got.open("rb") as f:
        assert artifacts.digest_of(f) == (stored["digest"], 100 << 20)
    print(f"100 MB: upload {uploaded:.1f} s, fetch and verify {fetched:.1f} s")

    # the same bytes again are not uploaded twice: the known location is reused
    end = end_offset(kafka_settings)
    again = artifacts.upload(kafka_settings, big, [{"version": 1, **stored}])
    assert again == stored and end_offset(kafka_settings) == end


def copy_chunks(
    settings: Settings, stored: dict[str, Any], change: Callable[[dict], dict | None]
) -> dict[str, Any]:
    """Write a file's chunks again at the end of the artifacts topic, each through
    ``change`` (None leaves it out); a version pointing at the copies."""
    where = stored["artifact"]
    consumer = Consumer(settings.kafka(**{"group.id": "copy"}))
    consumer.assign([TopicPartition(where["topic"], where["partition"], where["offset"])])
    chunks: list[dict] = []
    deadline = time.monotonic() + 30
    while len(chunks) < where["chunks"] and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and not msg.error():
            chunk = codec.decode("ArtifactChunk", msg.value())
            if chunk["digest"] == stored["digest"]:
                chunks.append(chunk)
    consumer.close()
    producer = Producer(settings.kafka())
    offsets: list[int] = []
    for chunk in chunks:
        changed = change(dict(chunk))
        if changed is not None:
            producer.produce(
                where["topic"],
                codec.encode("ArtifactChunk", changed),
                f"{changed['digest']}/{changed['index']}".encode(),
                where["partition"],
                on_delivery=lambda err, msg: offsets.append(msg.offset()),
            )
    assert producer.flush(30) == 0
    return {**stored, "artifact": {**where, "offset": min(offsets)}}


def test_a_tampered_chunk_is_refused_with_the_reason(kafka_settings, tmp_path) -> None:
    model = tmp_path / "m.bin"
    model.write_bytes(os.urandom(2500))
    stored = artifacts.upload(kafka_settings, model, chunk_bytes=1000)
    assert stored["artifact"]["chunks"] == 3
    host = Settings(bootstrap=kafka_settings.bootstrap, artifact_cache=str(tmp_path / "cache"))

    def flip(chunk: dict) -> dict:
        if chunk["index"] == 1:
            chunk["data"] = bytes([chunk["data"][0] ^ 1]) + chunk["data"][1:]
        return chunk

    def forge(chunk: dict) -> dict:  # consistent in itself: only the file's digest tells
        chunk = flip(chunk)
        chunk["chunk_sha256"] = hashlib.sha256(chunk["data"]).hexdigest()
        return chunk

    cases = [
        (flip, "chunk 1 of 3 .* is corrupt"),
        (forge, f"SHA-256 is [0-9a-f]{{64}}, not the deployed {stored['digest']}; refused"),
        (lambda c: None if c["index"] == 2 else c, "chunks 2 of 3 are not in"),
    ]
    for change, reason in cases:
        with pytest.raises(ArtifactError, match=reason):
            artifacts.fetch(
                host, {"path": str(model), **copy_chunks(kafka_settings, stored, change)}
            )
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    # the good copy still serves
    assert artifacts.fetch(host, {"path": str(model), **stored}).read_bytes() == model.read_bytes()

    # a replica asked to serve a tampered version answers with the reason, and lives on
    bad = copy_chunks(kafka_settings, stored, flip)
    version = {
        "version": 1,
        "path": str(model),
        "format": "skops",
        "method": "predict_proba",
        "nan_policy": "reject",
        "input_dim": None,
        "deployed_at_us": 0,
        **bad,
    }
    spec = {
        "version": 1,
        "versions": [version],
        "partitions": 1,
        "batch_max": 8,
        "batch_wait_ms": 2.0,
        "latency_slo_ms": 20.0,
    }
    registry.publish(
        kafka_settings, {"kind": "MODEL", "name": "tampered", "model": spec, "app": None}
    )
    fresh = Settings(bootstrap=kafka_settings.bootstrap, artifact_cache=str(tmp_path / "empty"))
    replica = Replica(fresh, "tampered")
    try:
        replica.follower.sync()
        reason = replica.adapter(1)
    finally:
        replica.follower.close()
    assert isinstance(reason, str) and "is corrupt" in reason and "tampered v1" in reason


def test_the_registry_records_digests_of_uploads_and_uris(kafka_settings, tmp_path) -> None:
    s = kafka_settings
    model = tmp_path / "m.skops"
    model.write_bytes(b"not really a model")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    end = end_offset(s)
    with pytest.raises(registry.RegistryError, match=f"has SHA-256 {digest}, not the"):
        registry.deploy_model(s, "checked", str(model), sha256="0" * 64)
    assert end_offset(s) == end  # refused before anything was uploaded
    spec = registry.deploy_model(s, "checked", str(model), sha256=digest)
    assert spec["versions"][-1]["digest"] == digest and spec["versions"][-1]["artifact"]
    spec = registry.deploy_model(s, "checked", model.as_uri())
    uri_version = spec["versions"][-1]
    assert uri_version["path"] == model.as_uri() and uri_version["artifact"] is None
    assert (uri_version["digest"], uri_version["size"]) == (digest, len(b"not really a model"))
    with pytest.raises(registry.RegistryError, match="model file not found"):
        registry.deploy_model(s, "checked", str(tmp_path / "missing.skops"))
    # what replicas read back from the control topic
    assert registry.current(s).version_spec("checked", 2) == uri_version
