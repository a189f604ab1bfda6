"""The floor: the cheapest pass-through over as many Kafka hops as clipstream's path.

Clipstream's query crosses four topics (queries, the model's requests, responses,
predictions). This process forwards each query through two relay topics unchanged and
then answers it with a Prediction naming no model, with no model and no batching logic:
what is left is the physical cost of the path (brokers, clients, Avro), the limit no
system on this path can beat.

Run as ``python -m clipstream.streams.bench.floor --prefix bench.floor``.
"""

from __future__ import annotations

import argparse
import signal
import time
from typing import Any

from confluent_kafka import Consumer, Producer

from clipstream.streams.wire import codec
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import FETCH_WAIT_MS, consume_ready


def topics_for(prefix: str) -> dict[str, str]:
    return {
        "queries": f"{prefix}.queries",
        "hop1": f"{prefix}.hop1",
        "hop2": f"{prefix}.hop2",
        "predictions": f"{prefix}.predictions",
    }


def prediction_for(query: dict[str, Any], label: str | None, score: float | None) -> bytes:
    """The Prediction record the bench's own systems answer with (same client decode)."""
    now = time.time_ns() // 1000
    return codec.encode(
        "Prediction",
        {
            "query_id": query["query_id"],
            "app": query["app"],
            "user": query["user"],
            "label": label,
            "score": score,
            "models": [],
            "answers": [],
            "cache_hit": False,
            "default": False,
            "error": None,
            "sent_at_us": query["sent_at_us"],
            "emitted_at_us": now,
            "worker_us": 0,
        },
    )


def loop_clients(settings: Settings, group: str) -> tuple[Consumer, Producer]:
    """The consumer and producer of a hand-written loop, tuned like clipstream's own
    clients (a fetch waits at most 100 ms for data that is not there, 1 ms linger) so the
    comparison is about the loop."""
    consumer = Consumer(
        settings.kafka(
            **{
                "group.id": group,
                "auto.offset.reset": "earliest",
                "fetch.wait.max.ms": FETCH_WAIT_MS,
                "enable.partition.eof": False,
            }
        )
    )
    return consumer, Producer(settings.kafka(**{"linger.ms": 1}))


def stop_on_signal() -> list[bool]:
    """A flag set by SIGTERM or SIGINT, which the loops check between messages."""
    stop = [False]

    def on_signal(*_: Any) -> None:
        stop[0] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def run(settings: Settings, prefix: str, stop: list[bool]) -> None:
    names = topics_for(prefix)
    consumer, producer = loop_clients(settings, f"{prefix}-relay")
    nxt = {names["queries"]: names["hop1"], names["hop1"]: names["hop2"]}
    consumer.subscribe([names["queries"], names["hop1"], names["hop2"]])
    try:
        while not stop[0]:
            for msg in consume_ready(consumer, 1000, 0.05):
                if msg.error():
                    continue
                # no key on its own hops: nothing needs a query on a given partition there,
                # and unkeyed records batch (librdkafka's sticky partitioner), as the
                # cheapest relay over these topics would
                to = nxt.get(msg.topic())
                if to is not None:
                    producer.produce(to, msg.value())
                else:
                    query = codec.decode("Query", msg.value())
                    producer.produce(names["predictions"], prediction_for(query, None, None))
            producer.poll(0)
    finally:
        producer.flush(5)
        consumer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prefix", default="bench.floor")
    args = parser.parse_args()
    run(Settings.from_env(), args.prefix, stop_on_signal())


if __name__ == "__main__":
    main()
