"""What de-duplication (streams/worker/dedup.py) costs: end-to-end latency with it on and off, in
alternating phases of one run against one broker, and the restore time at assignment.

    .venv/bin/python -m tests.integration.measure_dedup [--rate 100] [--seconds 15]

Not a test (nothing here asserts on speed); docs/guarantees.md quotes its output.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from confluent_kafka.admin import AdminClient

from clipstream.models.control import registry
from clipstream.models.training import digits_split, train_digits_models
from clipstream.streams.broker import EmbeddedBroker
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings

MODEL = "digits-logreg"
RESTORED = re.compile(
    r"restored (\d+) (recent|older) predictions of partitions \[[^]]*\] in ([\d.]+) s"
)


def phase(
    settings: Settings, logs: Path, dedup: bool, n: int, rate: float, tag: str
) -> tuple[list[float], list[tuple[int, str, float]]]:
    """Start a worker, send ``n`` queries at ``rate``/s, return their latencies (ms) and the
    worker's restores (predictions read, seconds)."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap(),
        "CLIPSTREAM_DEDUP": "1" if dedup else "0",
    }
    worker = spawn(f"worker-{tag}", clipstream_command("worker"), logs, env)
    client, reader = Client(settings), PredictionReader(settings)
    try:
        _, X, _, _ = digits_split()
        qid = client.send_query("cost", X[0].tolist(), deadline_ms=120_000)
        client.flush()
        deadline = time.monotonic() + 120
        while not any(r["query_id"] == qid for r in reader.poll(0.5)):
            if time.monotonic() > deadline:
                raise TimeoutError("worker not serving")
        sent: set[str] = set()
        latencies: list[float] = []
        start = time.monotonic()
        for i in range(n):
            sent.add(client.send_query("cost", X[i % len(X)].tolist()))
            for r in reader.poll(0, 500):
                if r["query_id"] in sent:
                    latencies.append((r["received_at_us"] - r["sent_at_us"]) / 1000)
            time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))  # pacing
        client.flush()
        deadline = time.monotonic() + 60
        while len(latencies) < len(sent) and time.monotonic() < deadline:
            for r in reader.poll(0.2):
                if r["query_id"] in sent:
                    latencies.append((r["received_at_us"] - r["sent_at_us"]) / 1000)
    finally:
        reader.close()
        worker.stop()
    restores = [
        (int(m.group(1)), m.group(2), float(m.group(3)))
        for m in RESTORED.finditer(worker.log_path.read_text(errors="replace"))
    ]
    return latencies, restores


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="clipstream-dedup-cost-"))
    with EmbeddedBroker(data_dir=work / "kafka") as broker:
        settings = Settings(bootstrap=broker.bootstrap)
        topics.ensure_topics(AdminClient(settings.kafka()), topics.TopicPlan(4).core())
        models = train_digits_models(work / "models", names=[MODEL])
        registry.deploy_model(settings, MODEL, str(models[MODEL][0]), input_dim=64)
        registry.register_app(settings, "cost", [MODEL], deadline_ms=1000, cache=False)
        env = {"KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap()}
        replica = spawn("replica", clipstream_command("replica", "--model", MODEL), work, env)
        children: list[Child] = [replica]
        try:
            results: dict[bool, list[float]] = {False: [], True: []}
            restores: list[tuple[int, str, float]] = []
            n = int(args.rate * args.seconds)
            for r in range(args.rounds):
                for dedup in (False, True):
                    tag = f"{'on' if dedup else 'off'}-{r}"
                    lat, rest = phase(settings, work, dedup, n, args.rate, tag)
                    results[dedup] += lat
                    restores += rest
                    print(f"phase {tag}: {len(lat)} predictions", flush=True)
        finally:
            for child in children:
                child.stop()
    print(f"\n{args.rate:.0f} queries/s, {args.rounds} rounds of {args.seconds:.0f} s per mode")
    print(f"{'dedup':>6} {'n':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for dedup in (False, True):
        lat = np.asarray(results[dedup])
        print(
            f"{'on' if dedup else 'off':>6} {lat.size:>6} "
            f"{np.percentile(lat, 50):>8.1f} {np.percentile(lat, 99):>8.1f}"
        )
    for count, what, seconds in restores:
        print(f"restore at assignment: {count} {what} predictions read in {seconds:.2f} s")


if __name__ == "__main__":
    main()
