"""What 1,000 concurrent queries cost through the asyncio SDK next to the sync one: per-query
latency (call to answer) p50/p99 and the burst's wall time, against one embedded broker,
one worker and one digits-logreg replica, in alternating rounds.

    .venv/bin/python -m tests.integration.measure_async_sdk [--queries 1000] [--rounds 2]

sync: ``Predictor.submit`` 1,000 times from one thread (each produces and flushes), then
every future; async: ``asyncio.gather`` of 1,000 ``AsyncPredictor.predict`` on one loop.
Not a test (nothing here asserts on speed); the machine may be shared, so give the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.models.training import digits_split, train_digits_models
from clipstream.streams.broker import EmbeddedBroker
from clipstream.streams.runtime.processes import clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader, Predictor
from clipstream.streams.sdk_async import AsyncPredictor
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from tests.integration.helpers import wait_until_serving

APP, MODEL = "measure-async", "digits-logreg"


def percentiles(latencies: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return q[49] * 1e3, q[98] * 1e3


def sync_round(predictor: Predictor, rows: list[list[float]]) -> tuple[list[float], float]:
    start = time.perf_counter()
    latencies: list[float] = []
    futures = []
    for x in rows:
        sent = time.perf_counter()
        future = predictor.submit(APP, x)
        future.add_done_callback(lambda _, sent=sent: latencies.append(time.perf_counter() - sent))
        futures.append(future)
    for future in futures:
        future.result(60)
    return latencies, time.perf_counter() - start


async def async_round(predictor: AsyncPredictor, rows: list[list[float]]) -> tuple[list, float]:
    async def one(x: list[float]) -> float:
        sent = time.perf_counter()
        await predictor.predict(APP, x, timeout=60)
        return time.perf_counter() - sent

    start = time.perf_counter()
    latencies = await asyncio.gather(*(one(x) for x in rows))
    return list(latencies), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(data_dir=Path(tmp)) as broker:
        settings = Settings(bootstrap=broker.bootstrap, partitions=4)
        topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
        model = train_digits_models(Path(tmp), names=[MODEL])[MODEL][0]
        registry.deploy_model(settings, MODEL, str(model), input_dim=64)
        # cache off: every query goes through the replica
        registry.register_app(settings, APP, [MODEL], deadline_ms=20_000, cache=False)
        env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "CLIPSTREAM_PARTITIONS": "4"}
        logs = Path(tmp) / "logs"
        children = [
            spawn("worker", clipstream_command("worker", "--web-port", "0"), logs, env),
            spawn("replica", clipstream_command("replica", "--model", MODEL), logs, env),
        ]
        try:
            _, X_test, _, _ = digits_split()
            rows = [X_test[i % len(X_test)].tolist() for i in range(args.queries)]
            reader = PredictionReader(settings)
            wait_until_serving(Client(settings), reader, APP, rows[0])
            reader.close()
            results: dict[str, list[tuple[list[float], float]]] = {"sync": [], "async": []}
            sync, asynchronous = Predictor(settings), AsyncPredictor(settings)
            try:
                for _ in range(args.rounds):
                    results["sync"].append(sync_round(sync, rows))
                    results["async"].append(asyncio.run(async_round(asynchronous, rows)))
            finally:
                sync.close()
                asyncio.run(asynchronous.close())
        finally:
            for child in children:
                child.stop()
        print(f"queries={args.queries} (concurrent) rounds={args.rounds}")
        for name, rounds in results.items():
            latencies = [t for lat, _ in rounds for t in lat]
            p50, p99 = percentiles(latencies)
            wall = statistics.median(w for _, w in rounds)
            print(
                f"{name:>5} SDK: p50 {p50:.1f} ms  p99 {p99:.1f} ms  "
                f"burst {wall * 1e3:.0f} ms ({args.queries / wall:.0f} q/s)"
            )


if __name__ == "__main__":
    main()
