"""What the REST gateway's predictions consumer costs per prediction on the cluster: CPU to
read N predictions decoding every one (what each worker's gateway did before predictions
were keyed by query id) against decoding only those whose key it waits for (now), side by
side in alternating rounds against one embedded broker.

    .venv/bin/python -m tests.integration.measure_gateway [--predictions 100000] [--rounds 3]

CPU is the whole process's (time.process_time: the Python thread and librdkafka's threads).
Not a test (nothing here asserts on speed); give the ratio, absolute numbers drift on a
shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from clipstream.streams.broker import EmbeddedBroker
from clipstream.streams.sdk import PredictionReader
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings


def prediction(qid: str) -> bytes:
    """A prediction as an Exp4 app over two models writes it."""
    answers = [
        {
            "model": name,
            "version": 1,
            "label": "3",
            "score": 0.8,
            "prob": 0.5,
            "error": None,
            "cache_hit": False,
        }
        for name in ("digits-logreg", "digits-forest")
    ]
    record = {
        "query_id": qid,
        "app": "digits",
        "user": "user-7",
        "label": "3",
        "score": 0.8,
        "models": ["digits-logreg@1", "digits-forest@1"],
        "answers": answers,
        "cache_hit": False,
        "default": False,
        "error": None,
        "sent_at_us": now_us(),
        "emitted_at_us": now_us(),
        "worker_us": 1200,
    }
    return codec.encode("Prediction", record)


def fill(settings: Settings, n: int) -> list[bytes]:
    """Produce ``n`` predictions keyed by query id over all partitions; their keys."""
    producer = Producer(settings.kafka(**{"linger.ms": 20, "batch.num.messages": 10000}))
    keys = []
    for _ in range(n):
        qid = uuid.uuid4().hex
        keys.append(qid.encode())
        while True:
            try:
                producer.produce(topics.PREDICTIONS, prediction(qid), qid.encode())
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0
    return keys


def read_all(settings: Settings, n: int, waiting: dict[bytes, None] | None) -> float:
    """CPU seconds to read all ``n`` predictions from the beginning, decoding every one
    (``waiting`` None) or only those whose key is waited for."""
    reader = PredictionReader(settings, from_beginning=True)
    try:
        reader.poll(1.0, 1)  # connect and fetch before the clock starts
        seen = 1
        cpu = time.process_time()
        while seen < n:
            before = reader.consumer.position(reader.consumer.assignment())
            reader.poll(0.5, 1000, keys=waiting)
            after = reader.consumer.position(reader.consumer.assignment())
            seen += sum(a.offset - b.offset for a, b in zip(after, before, strict=True))
        return time.process_time() - cpu
    finally:
        reader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--waiting", type=int, default=50, help="ids the gateway waits for")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(data_dir=Path(tmp)) as broker:
        settings = Settings(bootstrap=broker.bootstrap, partitions=4)
        topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
        keys = fill(settings, args.predictions)
        waiting = dict.fromkeys(keys[:: max(1, len(keys) // args.waiting)])
        before, after = [], []
        for _ in range(args.rounds):
            before.append(read_all(settings, args.predictions, None) / args.predictions)
            after.append(read_all(settings, args.predictions, waiting) / args.predictions)
        b, a = statistics.median(before), statistics.median(after)
        print(f"predictions={args.predictions} waiting={len(waiting)} rounds={args.rounds}")
        print(f"decode every prediction (before): {b * 1e6:.2f} us CPU per prediction")
        print(f"decode only waited-for keys (now): {a * 1e6:.2f} us CPU per prediction")
        print(f"ratio before/now: {b / a:.1f}x")


if __name__ == "__main__":
    main()
