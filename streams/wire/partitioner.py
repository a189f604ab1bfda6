"""Kafka's default key partitioner: murmur2 as the Java client computes it.

``murmur2`` is ``org.apache.kafka.common.utils.Utils.murmur2`` (a signed 32-bit result)
and ``to_positive`` is ``Utils.toPositive``; ``partition`` is what the Java client's
default partitioner and librdkafka's ``murmur2_random`` partitioner (the SDK's and the
serving loop's producers) pick for a non-empty key. Pure Python, no dependencies: the SDK
imports it too.
"""

from __future__ import annotations

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's ``Utils.murmur2``: the 32-bit MurmurHash2 of ``data`` (seed 0x9747b28c,
    little-endian 4-byte blocks), as Java's signed int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    blocks = length - length % 4
    for i in range(0, blocks, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    tail = length % 4
    if tail == 3:
        h ^= data[blocks + 2] << 16
    if tail >= 2:
        h ^= data[blocks + 1] << 8
    if tail >= 1:
        h ^= data[blocks]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - 0x1_0000_0000 if h & 0x8000_0000 else h


def to_positive(number: int) -> int:
    """Kafka's ``Utils.toPositive``: the sign bit cleared (not ``abs``: it maps
    ``Integer.MIN_VALUE`` to 0, and every value to one in [0, 2**31))."""
    return number & 0x7FFFFFFF


def partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a non-empty key."""
    return to_positive(murmur2(key)) % partitions
