"""Kafka's murmur2 partitioner (clipstream.streams.wire.partitioner) gives the results of
the Java client's ``Utils.murmur2`` and ``Utils.toPositive``, which librdkafka's
``murmur2_random`` partitioner (the SDK's and the serving loop's producers) reproduces: a
selection key's observations and its state must land on the same partition number."""

from __future__ import annotations

import ast
import hashlib
import struct
from pathlib import Path

import pytest

from clipstream.streams.wire import topics
from clipstream.streams.wire.partitioner import murmur2, partition, to_positive

ROOT = Path(__file__).resolve().parents[2]

#: Kafka's clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java (testMurmur2)
KAFKA_UTILS_TEST = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}

#: librdkafka's src/rdmurmur2.c unit test (java_murmur2_results): unaligned starts and
#: every tail length
LIBRDKAFKA_TEST = {
    b"kafka": 0xD067CF64,
    b"giberish123456789": 0x8F552B0C,
    b"1234": 0x9FC97B14,
    b"234": 0xE7C009CA,
    b"34": 0x873930DA,
    b"4": 0x5A4B5CA1,
    b"PreAmbleWillBeRemoved,ThePrePartThatIs": 0x78424F1C,
    b"reAmbleWillBeRemoved,ThePrePartThatIs": 0x4A62B377,
    b"eAmbleWillBeRemoved,ThePrePartThatIs": 0xE0E4E09E,
    b"AmbleWillBeRemoved,ThePrePartThatIs": 0x62B8B43F,
    b"": 0x106E08D9,
}


def signed(unsigned: int) -> int:
    return unsigned - (1 << 32) if unsigned & 0x8000_0000 else unsigned


@pytest.mark.parametrize(("data", "expected"), KAFKA_UTILS_TEST.items())
def test_murmur2_matches_kafkas_utils_test(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@pytest.mark.parametrize(("data", "expected"), LIBRDKAFKA_TEST.items())
def test_murmur2_matches_librdkafkas_java_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == signed(expected)


def test_to_positive_clears_the_sign_bit_as_kafka_does() -> None:
    assert to_positive(0) == 0
    assert to_positive(5) == 5
    assert to_positive(-1) == 0x7FFFFFFF
    assert to_positive(-(1 << 31)) == 0  # Integer.MIN_VALUE: not abs()
    assert to_positive(-973932308) == 1173551340


def sample_keys(n: int) -> list[bytes]:
    """Deterministic keys of every length from 0 to 79 bytes (all byte values)."""
    return [(hashlib.sha256(b"%d" % i).digest() * 3)[: i % 80] for i in range(n)]


#: sha256 over the big-endian murmur2 of the 20,000 sample keys, as aiokafka 0.14's
#: ``aiokafka.partitioner.murmur2`` (the implementation partition_for used before, itself
#: a port of the Java client's) computed them
SAMPLE_DIGEST = "542e8c34cc75e50a100102928cd06ab016ed2868192904b863c0119933b82319"


def test_murmur2_of_many_keys_matches_the_previous_implementation() -> None:
    digest = hashlib.sha256()
    for key in sample_keys(20_000):
        value = murmur2(key)
        assert -(1 << 31) <= value < 1 << 31
        digest.update(struct.pack(">i", value))
    assert digest.hexdigest() == SAMPLE_DIGEST


def test_partition_for_is_kafkas_default_partitioner_on_the_keys_utf8() -> None:
    # selection keys as the learner writes them, non-ASCII included
    for key, partitions, expected in [
        ("digits|u1", 4, 2),
        ("app|u0", 4, 3),
        ("digits-rest|", 4, 0),
        ("é|ü", 4, 2),
        ("x" * 33, 4, 1),
    ]:
        assert topics.partition_for(key, partitions) == expected
        assert partition(key.encode(), partitions) == expected
    for key in ("a", "bb", "ccc", "dddd", "app|user-17"):
        for partitions in (1, 3, 4, 12):
            assert topics.partition_for(key, partitions) == (
                to_positive(murmur2(key.encode())) % partitions
            )


#: the one module that imports Faust: the integration for users' Faust apps (its own extra)
FAUST_INTEGRATION = ROOT / "streams" / "integrations" / "faust.py"


def test_no_module_of_the_project_imports_faust_or_aiokafka() -> None:
    """The gateway runs on aiohttp and the partitioner is this module: neither framework is
    a dependency of the server (pyproject.toml), so no shipped module may import them but
    the Faust integration, which is installed with the faust extra."""
    found = []
    for folder in ("streams", "models", "selection"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == FAUST_INTEGRATION:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                found += [
                    f"{path.relative_to(ROOT)}: {name}"
                    for name in names
                    if name.partition(".")[0] in ("faust", "aiokafka", "mode")
                ]
    assert found == []
