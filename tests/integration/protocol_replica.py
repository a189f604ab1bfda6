"""A model replica written only from docs/replica-protocol.md: its own Kafka consumer and
producer (confluent-kafka), the Avro schema files, and onnxruntime for ONNX model files. It
imports nothing from clipstream, as a replica in another language could not.

    python protocol_replica.py --bootstrap HOST:PORT --model NAME --schemas DIR

It serves labels only (no class scores), rejects rows with NaN or inf, and knows only the
current schema files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
import onnxruntime
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)

CONTROL = "clipstream.control"
RESPONSES = "clipstream.model.responses"
DEADLETTER = "clipstream.deadletter"

# -- section 2: single-object encoding, CRC-64-AVRO of the Parsing Canonical Form ------------

EMPTY = 0xC15D213AA4D7A795


def _table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (EMPTY & -(fp & 1))
        table.append(fp)
    return table


TABLE = _table()


def crc64_avro(data: bytes) -> int:
    fp = EMPTY
    for b in data:
        fp = (fp >> 8) ^ TABLE[(fp ^ b) & 0xFF]
    return fp


class Avro:
    def __init__(self, schemas: Path) -> None:
        self.kinds: dict[str, tuple[bytes, Any]] = {}
        for kind, file in (
            ("ModelBatch", "model_batch.avsc"),
            ("ModelBatchResult", "model_batch_result.avsc"),
            ("ControlRecord", "control_record.avsc"),
            ("ArtifactChunk", "artifact_chunk.avsc"),
            ("DeadLetter", "dead_letter.avsc"),
        ):
            schema = json.loads((schemas / file).read_text())
            canonical = fastavro.schema.to_parsing_canonical_form(schema)
            header = b"\xc3\x01" + crc64_avro(canonical.encode()).to_bytes(8, "little")
            self.kinds[kind] = (header, fastavro.parse_schema(schema))

    def encode(self, kind: str, record: dict[str, Any]) -> bytes:
        header, schema = self.kinds[kind]
        buf = io.BytesIO()
        buf.write(header)
        fastavro.schemaless_writer(buf, schema, record)
        return buf.getvalue()

    def decode(self, kind: str, data: bytes | None) -> dict[str, Any]:
        header, schema = self.kinds[kind]
        if not data or data[:10] != header:
            raise ValueError(f"not a {kind} of the schema this replica knows")
        buf = io.BytesIO(data[10:])
        try:
            record = fastavro.schemaless_reader(buf, schema, schema)
        except Exception as exc:
            raise ValueError(f"not a valid {kind}: {type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data) - 10:
            raise ValueError(f"not a valid {kind}: trailing bytes")
        return record


# -- sections 5 and 6: versions from the control topic, files from the artifacts topic -------


class Versions:
    def __init__(self, bootstrap: str, model: str, avro: Avro) -> None:
        self.bootstrap, self.model, self.avro = bootstrap, model, avro
        self.specs: dict[int, dict[str, Any]] = {}
        self.serving: int | None = None
        self.loaded: dict[int, Any] = {}  # version -> (session, input name) or a reason
        self.control = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"protocol-replica-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        self.control.assign([TopicPartition(CONTROL, 0, OFFSET_BEGINNING)])

    def read(self, timeout: float) -> bool:
        """Apply control records that arrive within ``timeout``; True at the end."""
        for msg in self.control.consume(100, timeout):
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    return True
                continue
            try:
                record = self.avro.decode("ControlRecord", msg.value())
            except ValueError:
                continue
            if record["kind"] != "MODEL" or record["name"] != self.model:
                continue
            if record["deleted"] or record["model"] is None:
                self.specs, self.serving = {}, None
            else:
                self.specs = {v["version"]: v for v in record["model"]["versions"]}
                self.serving = record["model"]["version"]
        return False

    def get(self, version: int) -> Any:
        if version not in self.loaded:
            deadline = time.monotonic() + 2.0  # the deploy record may still be on its way
            while version not in self.specs and time.monotonic() < deadline:
                self.read(0.1)
            spec = self.specs.get(version)
            if spec is None:
                return f"model {self.model} has no version {version} in the registry"
            try:
                self.loaded[version] = self.load(spec)
            except Exception as exc:
                self.loaded[version] = f"cannot load {self.model} v{version}: {exc}"
        return self.loaded[version]

    def load(self, spec: dict[str, Any]) -> tuple[Any, str]:
        if spec["format"] != "onnx":
            raise ValueError(f"format {spec['format']} is not served here, only onnx")
        where = spec["artifact"]
        if where is None:
            raise ValueError("only files kept in the cluster are served here")
        reader = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"protocol-replica-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
            }
        )
        reader.assign([TopicPartition(where["topic"], where["partition"], where["offset"])])
        chunks: dict[int, bytes] = {}
        try:
            while len(chunks) < where["chunks"]:
                msg = reader.poll(10.0)
                if msg is None:
                    raise ValueError("no chunk within 10 s")
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        raise ValueError("the file's chunks end early")
                    raise ValueError(str(msg.error()))
                chunk = self.avro.decode("ArtifactChunk", msg.value())
                if chunk["digest"] != spec["digest"] or chunk["index"] in chunks:
                    continue
                if hashlib.sha256(chunk["data"]).hexdigest() != chunk["chunk_sha256"]:
                    raise ValueError(f"chunk {chunk['index']} is corrupt")
                if chunk["count"] != where["chunks"]:
                    raise ValueError(f"chunk {chunk['index']} has the wrong count")
                chunks[chunk["index"]] = chunk["data"]
        finally:
            reader.close()
        data = b"".join(chunks[i] for i in range(where["chunks"]))
        if hashlib.sha256(data).hexdigest() != spec["digest"]:
            raise ValueError("the file does not match its digest")
        session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session, session.get_inputs()[0].name


# -- sections 3 and 4: serve each batch, answer on its partition, commit once delivered ------


def answer(versions: Versions, batch: dict[str, Any], replica: str) -> dict[str, Any]:
    started = time.perf_counter()
    n = len(batch["query_ids"])
    labels: list[str | None] = [None] * n
    errors: list[str | None] = [None] * n
    model = versions.get(batch["version"])
    if isinstance(model, str):
        errors = [model] * n
    elif batch["rows"] != n or len(batch["inputs"]) != 8 * batch["rows"] * batch["cols"]:
        errors = ["malformed batch"] * n
    else:
        session, input_name = model
        X = np.frombuffer(batch["inputs"], dtype="<f8").reshape(batch["rows"], batch["cols"])
        good = np.isfinite(X).all(axis=1)
        for i in np.flatnonzero(~good):
            errors[i] = "input contains NaN or inf"
        if good.any():
            rows = np.flatnonzero(good)
            try:
                out = session.run(None, {input_name: X[rows].astype(np.float32)})[0]
                for i, label in zip(rows, out, strict=True):
                    labels[i] = str(label)
            except Exception as exc:
                for i in rows:
                    errors[i] = f"model failed: {exc}"
    return {
        "batch_id": batch["batch_id"],
        "model": batch["model"],
        "version": batch["version"],
        "replica": replica,
        "query_ids": batch["query_ids"],
        "labels": labels,
        "classes": [],
        "scores": b"",
        "errors": errors,
        "batch_sent_at_us": batch["sent_at_us"],
        "model_us": int((time.perf_counter() - started) * 1e6),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--schemas", type=Path, required=True)
    args = parser.parse_args()
    avro = Avro(args.schemas)
    replica = f"protocol-{socket.gethostname()}-{os.getpid()}"
    versions = Versions(args.bootstrap, args.model, avro)
    while not versions.read(0.5):
        pass
    if versions.serving is not None:
        versions.get(versions.serving)
    consumer = Consumer(
        {
            "bootstrap.servers": args.bootstrap,
            "group.id": f"clipstream-model-{args.model}",
            "auto.offset.reset": "earliest",
            "enable.auto.offset.store": False,
            "enable.auto.commit": True,
            "auto.commit.interval.ms": 200,
            "partition.assignment.strategy": "cooperative-sticky",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "fetch.wait.max.ms": 5,
        }
    )
    producer = Producer(
        {"bootstrap.servers": args.bootstrap, "enable.idempotence": True, "linger.ms": 0}
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    consumer.subscribe([f"clipstream.model.{args.model}.requests"])
    print("serving", flush=True)
    try:
        while not stopping:
            versions.read(0)
            producer.poll(0)
            msg = consumer.poll(0.05)
            if msg is None or msg.error():
                continue
            try:
                batch = avro.decode("ModelBatch", msg.value())
            except ValueError as exc:
                producer.produce(
                    DEADLETTER,
                    avro.encode(
                        "DeadLetter",
                        {
                            "source_topic": msg.topic(),
                            "partition": msg.partition(),
                            "offset": msg.offset(),
                            "key": msg.key(),
                            "value": msg.value(),
                            "reason": str(exc),
                            "stage": "replica",
                            "query_id": None,
                            "at_us": time.time_ns() // 1000,
                        },
                    ),
                )
                consumer.store_offsets(msg)
                continue
            result = answer(versions, batch, replica)

            def delivered(err: Any, _msg: Any, request: Any = msg) -> None:
                if err is None:
                    with contextlib.suppress(KafkaException):  # the partition moved meanwhile
                        consumer.store_offsets(request)

            producer.produce(
                RESPONSES,
                avro.encode("ModelBatchResult", result),
                batch["batch_id"].encode(),
                partition=batch["reply_partition"],
                on_delivery=delivered,
            )
    finally:
        producer.flush(10)
        consumer.close()
        versions.control.close()


if __name__ == "__main__":
    main()
