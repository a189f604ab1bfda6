"""``clipstream demo``: the whole path on digits, from an empty machine to a summary line."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clipstream.models.control import registry
from clipstream.models.files import load_model, save_onnx
from clipstream.models.training import digits_split, train_digits_models
from clipstream.streams.runtime.processes import Child, clipstream_command, spawn
from clipstream.streams.sdk import Client, PredictionReader
from clipstream.streams.wire.config import Settings

console = Console(stderr=True)

DEMO_APP = "digits"
DEMO_MODELS = ("digits-logreg", "digits-forest", "digits-svc")


@contextlib.contextmanager
def kafka(settings: Settings, workdir: Path, peak: bool = False) -> Iterator[Settings]:
    """The configured cluster, else an embedded broker for the duration of the block
    (``peak``: tuned for sustained load rather than a quick start)."""
    if settings.bootstrap:
        yield settings
        return
    from clipstream.streams.broker import PEAK_JIT, EmbeddedBroker

    console.print("starting the embedded Kafka broker (first run resolves its jars) ...")
    broker = EmbeddedBroker(data_dir=workdir / "kafka", jvm_options=PEAK_JIT if peak else ())
    broker.start()
    try:
        settings.bootstrap = broker.bootstrap
        yield settings
    finally:
        broker.stop()


def wait_until_serving(client: Client, reader: PredictionReader, timeout: float = 120.0) -> None:
    """One query with a long deadline: answered once the worker and every replica are up."""
    zero = [0.0] * 64
    qid = client.send_query(DEMO_APP, zero, deadline_ms=int(timeout * 1000))
    client.flush()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in reader.poll(0.2):
            if record["query_id"] == qid:
                return
    raise TimeoutError(f"no prediction within {timeout:.0f}s: worker or replicas not serving")


def run_demo(rate: float = 150.0, replicas: int = 1, workdir: Path | None = None) -> int:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="clipstream-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    children: list[Child] = []
    try:
        with kafka(settings, workdir) as settings:
            env = {"KAFKA_BOOTSTRAP_SERVERS": settings.require_bootstrap()}
            console.print("training digits models, served as ONNX ...")
            trained = train_digits_models(workdir / "models", names=list(DEMO_MODELS))
            for name, (_, acc) in sorted(trained.items()):
                console.print(f"  {name:15s} offline accuracy {acc:.3f}")
            from confluent_kafka.admin import AdminClient

            from clipstream.streams.wire import topics

            topics.ensure_topics(
                AdminClient(settings.kafka()), topics.TopicPlan.of(settings).core()
            )
            for name in DEMO_MODELS:
                # onnxruntime, as a production deployment would: scikit-learn's 100-tree
                # forest spends ~4 ms on a call, onnxruntime ~0.03 ms
                path = trained[name][0]
                onnx = save_onnx(load_model(path), path.with_suffix(".onnx"), 64)
                registry.deploy_model(settings, name, str(onnx), fmt="onnx", input_dim=64)
            registry.register_app(
                settings,
                DEMO_APP,
                list(DEMO_MODELS),
                policy="EXP4",
                deadline_ms=1000,
                default_label="0",
            )
            logs = workdir / "logs"
            children.append(spawn("worker", clipstream_command("worker"), logs, env))
            for name in DEMO_MODELS:
                for i in range(replicas):
                    children.append(
                        spawn(
                            f"replica-{name}-{i}",
                            clipstream_command("replica", "--model", name),
                            logs,
                            env,
                        )
                    )
            client = Client(settings)
            reader = PredictionReader(settings)
            console.print("waiting for the worker and replicas to serve ...")
            try:
                wait_until_serving(client, reader)
            except TimeoutError:
                for child in children:
                    console.print(f"--- {child.name} ---\n{child.log_tail(15)}")
                raise
            warm_up(client, reader, rate)
            summary = stream_test_set(client, reader, rate)
            reader.close()
            client.producer.close()  # flushed: closed before the broker goes, it stays quiet
            stop_all(children)  # before the broker goes: they would retry it forever
    except KeyboardInterrupt:
        console.print("interrupted: stopping everything")
        return 130
    finally:
        stop_all(children)
    console.print(f"logs and models in {workdir}")
    print(summary, flush=True)
    return 0 if "lost=0" in summary else 1


def stop_all(children: list[Child]) -> None:
    for child in children:
        child.signal(signal.SIGTERM)
    for child in children:
        child.stop()


def warm_up(client: Client, reader: PredictionReader, rate: float, seconds: float = 1.0) -> None:
    """Training rows at the demo's rate, with feedback, not counted: the processes all
    started a moment ago (the broker without its JIT, the replicas' first batches, the
    worker finishing its start-up) and the first fraction of a second was 100-350 ms slow, which
    is start-up, not serving."""
    X_train, _, y_train, _ = digits_split()
    n = int(rate * seconds)
    stream(client, reader, X_train[:n], y_train[:n], rate)


def stream(
    client: Client,
    reader: PredictionReader,
    X: np.ndarray,
    y: np.ndarray,
    rate: float,
    sent: Callable[[], None] = lambda: None,
    answered: Callable[[], None] = lambda: None,
) -> tuple[dict[str, str], dict[str, dict]]:
    """Send the rows as queries at ``rate`` and feedback for each prediction; returns the
    true label per query id and the prediction per query id that got one (within 30 s)."""
    truth: dict[str, str] = {}
    got: dict[str, dict] = {}
    start = time.monotonic()

    def drain(timeout: float) -> None:
        for record in reader.poll(timeout):
            qid = record["query_id"]
            if qid in truth and qid not in got:
                got[qid] = record
                client.send_feedback(qid, DEMO_APP, label=truth[qid])
                answered()

    for i, (x, label) in enumerate(zip(X, y, strict=True)):
        # open loop at a fixed rate: the schedule, not the answers, paces the sends
        while (wait := start + i / rate - time.monotonic()) > 0:
            drain(wait)  # blocks in librdkafka until a prediction or the send time
        truth[client.send_query(DEMO_APP, x.tolist())] = str(label)
        sent()
    deadline = time.monotonic() + 30
    while len(got) < len(truth) and time.monotonic() < deadline:
        drain(0.2)
    return truth, got


def stream_test_set(client: Client, reader: PredictionReader, rate: float) -> str:
    _, X_test, _, y_test = digits_split()
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        sending = progress.add_task("queries sent", total=len(X_test))
        answering = progress.add_task("predictions", total=len(X_test))
        truth, got = stream(
            client,
            reader,
            X_test,
            y_test,
            rate,
            sent=lambda: progress.advance(sending),
            answered=lambda: progress.advance(answering),
        )
    client.flush()
    latencies = np.array([(r["received_at_us"] - r["sent_at_us"]) / 1000 for r in got.values()])
    correct = sum(r["label"] == truth[q] for q, r in got.items())
    defaults = sum(r["default"] for r in got.values())
    lost = len(truth) - len(got)
    p50, p99 = np.percentile(latencies, [50, 99]) if len(latencies) else (float("nan"),) * 2
    return (
        f"demo: queries={len(truth)} predictions={len(got)} "
        f"accuracy={correct / max(1, len(got)):.3f} p50_ms={p50:.1f} p99_ms={p99:.1f} "
        f"defaults={defaults} lost={lost}"
    )


if __name__ == "__main__":
    raise SystemExit(run_demo(rate=float(os.environ.get("DEMO_RATE", "150"))))
