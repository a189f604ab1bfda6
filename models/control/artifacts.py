"""Model artifacts any replica can fetch: a file's bytes kept in the cluster, or at a URI.

``clipstream model deploy`` uploads a local file to the compacted topic
``clipstream.artifacts`` as ArtifactChunk records small enough for the broker's message
size limit, and records the file's SHA-256 digest, size and where its chunks start
(partition and offset) in the model version. A replica reads from that offset until it has
every chunk, not the whole topic. A file at a URI (s3://, gs://, https://, file://) is read
with fsspec instead (s3 and gs need the ``s3fs`` or ``gcsfs`` package). Either way every
chunk and the whole file are checked against the digests before the file enters the
replica's cache, where it is kept under its digest; bytes that do not match are refused with
the reason (DESIGN.md invariant 4).

Chunk keys are ``<digest>/<index>``, so compaction never removes a chunk: a key is written
once, because a file whose digest the registry already holds is not uploaded again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from clipstream.streams.wire import codec
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import consume_ready, produce

ARTIFACTS = "clipstream.artifacts"
#: well under Kafka's default limit of 1 MB per message, with room for the record around it
CHUNK_BYTES = 512 * 1024
READ_BYTES = 1 << 20
DIGEST = re.compile(r"^[0-9a-f]{64}$")


class ArtifactError(ValueError):
    """An artifact that cannot be stored, found or trusted; the message says why."""


def is_uri(source: str) -> bool:
    """A URI for fsspec (``s3://b/k``), not a local path (``C:\\m`` has a one-letter scheme)."""
    return "://" in source and len(urllib.parse.urlsplit(source).scheme) > 1


def cache_dir(settings: Settings) -> Path:
    if settings.artifact_cache:
        return Path(settings.artifact_cache)
    return Path.home() / ".cache" / "clipstream" / "artifacts"


def digest_of(stream: IO[bytes]) -> tuple[str, int]:
    """SHA-256 (hex) and size of everything left in ``stream``."""
    sha, size = hashlib.sha256(), 0
    while block := stream.read(READ_BYTES):
        sha.update(block)
        size += len(block)
    return sha.hexdigest(), size


def check_digest(value: str) -> str:
    digest = value.lower().removeprefix("sha256:")
    if not DIGEST.match(digest):
        raise ArtifactError(f"not a SHA-256 digest (64 hex digits): {value!r}")
    return digest


# -- deploying --------------------------------------------------------------------------


def upload(
    settings: Settings,
    path: Path | str,
    known: Iterable[Mapping[str, Any]] = (),
    *,
    expected: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    timeout: float = 120.0,
) -> dict[str, Any]:
    """Put a local file's bytes in the cluster, unless one of the ``known`` model versions
    already holds a file with the same digest; returns the version fields ``digest``,
    ``size`` and ``artifact`` (where the chunks are). ``expected``: the digest the operator
    says the file has; a file that differs is refused before anything is uploaded."""
    path = Path(path)
    if not path.exists() or path.is_dir():
        raise ArtifactError(f"model file not found: {path}")
    with path.open("rb") as f:
        digest, size = digest_of(f)
    if expected is not None and check_digest(expected) != digest:
        raise ArtifactError(f"{path} has SHA-256 {digest}, not the {expected} given; refused")
    for version in known:
        if version.get("digest") == digest and version.get("artifact"):
            return {"digest": digest, "size": size, "artifact": dict(version["artifact"])}
    ensure_topic(settings)
    count = max(1, -(-size // chunk_bytes))
    producer = Producer(
        settings.kafka(**{"enable.idempotence": True, "linger.ms": 5, "client.id": "deploy"})
    )
    offsets: list[int] = []
    errors: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(str(err))
        else:
            offsets.append(msg.offset())

    sent = hashlib.sha256()
    with path.open("rb") as f:
        for index in range(count):
            data = f.read(chunk_bytes)
            sent.update(data)
            value = codec.encode(
                "ArtifactChunk",
                {
                    "digest": digest,
                    "index": index,
                    "count": count,
                    "size": size,
                    "chunk_sha256": hashlib.sha256(data).hexdigest(),
                    "data": data,
                },
            )
            produce(
                producer,
                ARTIFACTS,
                value,
                f"{digest}/{index}".encode(),
                partition=0,
                on_delivery=delivered,
            )
            producer.poll(0)
    left = producer.flush(timeout)
    if sent.hexdigest() != digest:
        raise ArtifactError(f"{path} changed while it was uploaded; deploy it again")
    if left or errors or len(offsets) != count:
        raise ArtifactError(
            f"upload of {path} to {ARTIFACTS} failed: {len(offsets)} of {count} chunks "
            f"delivered{'; ' + errors[0] if errors else ''}"
        )
    return {
        "digest": digest,
        "size": size,
        "artifact": {
            "topic": ARTIFACTS,
            "partition": 0,
            "offset": min(offsets),
            "chunks": count,
            "chunk_bytes": chunk_bytes,
        },
    }


def describe_uri(uri: str, sha256: str | None = None) -> dict[str, Any]:
    """Digest and size of a file at a URI: read once to compute them, or the digest the
    operator gave (then the file need not be reachable from where it is deployed)."""
    if sha256 is not None:
        return {"digest": check_digest(sha256), "size": None, "artifact": None}
    with _open(uri) as f:
        digest, size = digest_of(f)
    return {"digest": digest, "size": size, "artifact": None}


def ensure_topic(settings: Settings) -> None:
    from confluent_kafka.admin import AdminClient

    from clipstream.streams.wire import topics

    plan = topics.TopicPlan.of(settings)
    artifacts = plan.topic(ARTIFACTS, 1, {"cleanup.policy": "compact"})
    topics.ensure_topics(AdminClient(settings.kafka()), [artifacts])


# -- fetching ---------------------------------------------------------------------------


def describe(version: Mapping[str, Any]) -> str:
    """Where a version's file comes from, for messages."""
    digest = version.get("digest")
    if not digest:
        return str(version["path"])
    where = version["artifact"]["topic"] if version.get("artifact") else version["path"]
    return f"{where} (sha256 {digest[:12]}, deployed from {version['path']})"


def fetch(settings: Settings, version: Mapping[str, Any], stall_s: float = 60.0) -> Path:
    """The local file of a model version, verified against its digest: from the cache, else
    fetched from the artifacts topic or its URI into the cache first. Raises ArtifactError
    with the reason when the bytes cannot be had or do not match."""
    digest = version.get("digest")
    if not digest:  # deployed before artifacts existed: the path as the operator named it
        return Path(version["path"])
    cached = cache_dir(settings) / digest
    if cached.is_file():  # only ever written whole and verified (below)
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=cached.parent, prefix=f".{digest}.")
    try:
        with os.fdopen(fd, "w+b") as out:
            if version.get("artifact"):
                _read_chunks(settings, version["artifact"], digest, out, stall_s)
            else:
                with _open(str(version["path"])) as source:
                    while block := source.read(READ_BYTES):
                        out.write(block)
            out.seek(0)
            got, size = digest_of(out)
        if got != digest:
            raise ArtifactError(
                f"{describe(version)}: the file's SHA-256 is {got}, not the deployed "
                f"{digest}; refused"
            )
        if version.get("size") is not None and size != version["size"]:
            raise ArtifactError(f"{describe(version)}: {size} bytes, not {version['size']}")
        os.replace(name, cached)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
    return cached


def _open(uri: str) -> Any:
    import fsspec

    try:
        return fsspec.open(uri, "rb").open()
    except (ImportError, ValueError) as exc:  # unknown scheme, or its driver not installed
        raise ArtifactError(f"cannot read {uri}: {exc}") from None
    except OSError as exc:
        raise ArtifactError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from None


def _read_chunks(
    settings: Settings, where: Mapping[str, Any], digest: str, out: IO[bytes], stall_s: float
) -> None:
    """Write the chunks of ``digest`` into ``out``, reading the artifacts partition from the
    first chunk's offset until every chunk is in, each checked against its own digest."""
    topic, partition, offset = where["topic"], where["partition"], where["offset"]
    count, chunk_bytes = where["chunks"], where["chunk_bytes"]
    consumer = Consumer(
        settings.kafka(
            **{
                # assign(), never subscribe(): the group only satisfies the client
                "group.id": f"clipstream-artifact-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "max.partition.fetch.bytes": 8 * READ_BYTES,
            }
        )
    )
    consumer.assign([TopicPartition(topic, partition, offset)])
    missing = set(range(count))
    here = f"{topic}[{partition}] from offset {offset}"
    stalled_at = time.monotonic() + stall_s
    try:
        while missing:
            if time.monotonic() > stalled_at:
                raise ArtifactError(
                    f"artifact {digest[:12]}: no chunk arrived from {here} in {stall_s:g} s; "
                    f"{len(missing)} of {count} chunks missing"
                )
            for msg in consume_ready(consumer, 64, 0.5):
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        raise ArtifactError(
                            f"artifact {digest[:12]}: chunks {_some(missing)} of {count} are "
                            f"not in {here} (was the topic deleted or truncated?)"
                        )
                    raise ArtifactError(f"artifact {digest[:12]}: reading {here}: {msg.error()}")
                chunk = _checked_chunk(msg, digest, count, chunk_bytes, missing)
                if chunk is None:
                    continue
                index, data = chunk
                out.seek(index * chunk_bytes)
                out.write(data)
                missing.discard(index)
                stalled_at = time.monotonic() + stall_s
                if not missing:
                    break
    finally:
        consumer.close()


def _checked_chunk(
    msg: Any, digest: str, count: int, chunk_bytes: int, missing: set[int]
) -> tuple[int, bytes] | None:
    """A message's chunk of ``digest`` (index and data) once checked; None for another file's
    chunk or a copy of one already read. A chunk this file needs that does not check out is
    refused with the reason."""
    ours = (msg.key() or b"").startswith(digest.encode())
    try:
        chunk = codec.decode("ArtifactChunk", msg.value())
    except codec.DecodeError as exc:
        if ours:
            raise ArtifactError(
                f"artifact {digest[:12]}: the record at offset {msg.offset()} is not a chunk: {exc}"
            ) from None
        return None
    if chunk["digest"] != digest:
        return None
    index = chunk["index"]
    if index in range(count) and index not in missing:
        return None
    at = f"artifact {digest[:12]}: chunk {index} of {count} (offset {msg.offset()})"
    if chunk["count"] != count or not 0 <= index < count:
        raise ArtifactError(f"{at} says it is chunk {index} of {chunk['count']}; refused")
    data = chunk["data"]
    got = hashlib.sha256(data).hexdigest()
    if got != chunk["chunk_sha256"]:
        raise ArtifactError(
            f"{at} is corrupt: its data's SHA-256 is {got[:12]}, the chunk says "
            f"{chunk['chunk_sha256'][:12]}; refused"
        )
    size = chunk["size"]
    expected = chunk_bytes if index < count - 1 else size - (count - 1) * chunk_bytes
    if len(data) != expected:
        raise ArtifactError(f"{at} holds {len(data)} bytes, not {expected}; refused")
    return index, data


def _some(indices: set[int]) -> str:
    first = sorted(indices)[:5]
    return ", ".join(map(str, first)) + (", ..." if len(indices) > 5 else "")
