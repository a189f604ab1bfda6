"""A model replica: one member of the model's Kafka consumer group.

Each ``clipstream.model.<name>.requests`` message is one batch. The replica predicts it in
one vectorised call and answers on ``clipstream.model.responses`` at the partition the
worker named, so the answer reaches the worker holding the query. Offsets are stored only
once the answer is delivered: a replica killed mid-batch leaves the batch uncommitted and
another member of the group serves it (the worker drops the duplicate answer if both
arrive).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from clipstream.models.adapters import BatchOutput, ModelAdapter, adapter_for
from clipstream.models.control import artifacts
from clipstream.models.control.registry import ControlFollower
from clipstream.models.files import load_model
from clipstream.streams.runtime import heap, metrics
from clipstream.streams.wire import codec, topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.dead_letter import encode_dead_letter
from clipstream.streams.wire.kafka import (
    FETCH_WAIT_MS,
    consume_ready,
    group_session_timeout_ms,
    produce,
)

log = logging.getLogger("clipstream.replica")


class Replica:
    def __init__(
        self,
        settings: Settings,
        model: str,
        *,
        replica_id: str | None = None,
        trust_pickle: bool = False,
        trusted_types: list[str] | None = None,
        adapters: dict[int, ModelAdapter] | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}"
        self.trust_pickle = trust_pickle or settings.trust_pickle
        self.trusted_types = (
            trusted_types if trusted_types is not None else settings.trusted_type_list()
        )
        # version -> adapter; pre-filled adapters let tests serve callables without files
        self._adapters: dict[int, ModelAdapter] = dict(adapters or {})
        self._failed: dict[int, str] = {}
        self._unknown_until: dict[int, float] = {}
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.batches_served = 0
        self.follower = ControlFollower(settings, sensor=metrics.Prometheus())

    # -- model versions -------------------------------------------------------------------

    def adapter(self, version: int) -> ModelAdapter | str:
        """The adapter for a version, loading it on first use; a string says why not."""
        found = self._adapters.get(version)
        if found is not None:
            return found
        if version in self._failed:
            return self._failed[version]
        spec = self.follower.registry.version_spec(self.model, version)
        if spec is None and time.monotonic() >= self._unknown_until.get(version, 0.0):
            # a batch can overtake the deploy record on its way here: wait for it once
            registry = self.follower.registry
            self.follower.wait_until(
                lambda: registry.version_spec(self.model, version) is not None, 2.0
            )
            spec = registry.version_spec(self.model, version)
            if spec is None:
                self._unknown_until[version] = time.monotonic() + 5.0
        if spec is None:
            return f"model {self.model} has no version {version} in the registry"
        try:
            # the file as deployed, from this host's cache or fetched and checked against
            # its digest (models/control/artifacts.py)
            model = load_model(
                artifacts.fetch(self.settings, spec),
                format=spec["format"],
                trusted=self.trusted_types,
                trust_pickle=self.trust_pickle,
            )
            adapter = adapter_for(
                model, self.model, version, method=spec["method"], nan_policy=spec["nan_policy"]
            )
        except Exception as exc:  # a bad file must not take the replica down
            reason = f"cannot load {self.model} v{version} from {artifacts.describe(spec)}: {exc}"
            log.error(reason)
            self._failed[version] = reason
            return reason
        self._adapters[version] = adapter
        if self.ready.is_set():  # loaded while serving: see warm()
            heap.freeze_loaded()
        return adapter

    def warm(self) -> None:
        """Load the serving version before taking traffic, so the first batch is not slow."""
        spec = self.follower.registry.model(self.model)
        if spec is not None:
            self.adapter(spec["version"])
        # the model and everything imported live as long as the replica (runtime.heap)
        log.info("%d objects loaded and exempt from garbage collection", heap.freeze_loaded())

    # -- serving ----------------------------------------------------------------------------

    def serve_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Answer one decoded ModelBatch (pure: no Kafka), never raising for bad input."""
        started = now_us()
        n = len(batch["query_ids"])
        adapter = self.adapter(batch["version"])
        output: BatchOutput | None = None
        if isinstance(adapter, str):
            errors: list[str | None] = [adapter] * n
        elif batch["rows"] != n or len(batch["inputs"]) != 8 * batch["rows"] * batch["cols"]:
            errors = [
                f"malformed batch: {n} query ids, {batch['rows']}x{batch['cols']} matrix, "
                f"{len(batch['inputs'])} input bytes"
            ] * n
        else:
            X = np.frombuffer(batch["inputs"], dtype="<f8").reshape(batch["rows"], batch["cols"])
            output = adapter.predict_batch(X)
            errors = list(output.errors)
        finished = now_us()
        metrics.REPLICA_BATCHES.labels(self.model).inc()
        metrics.REPLICA_BATCH_SIZE.labels(self.model).observe(n)
        # a version this replica cannot serve gets one label, whatever a batch claims
        version = "unknown" if isinstance(adapter, str) else str(batch["version"])
        metrics.REPLICA_ROWS.labels(self.model, version).inc(n)
        metrics.REPLICA_MODEL_LATENCY.labels(self.model).observe((finished - started) / 1e6)
        metrics.REPLICA_QUEUE_LATENCY.labels(self.model).observe(
            max(0, started - batch["sent_at_us"]) / 1e6
        )
        failed = sum(e is not None for e in errors)
        if failed:
            metrics.REPLICA_ERRORS.labels(self.model).inc(failed)
        return {
            "batch_id": batch["batch_id"],
            "model": self.model,
            "version": batch["version"],
            "replica": self.replica_id,
            "query_ids": batch["query_ids"],
            "labels": output.labels if output is not None else [None] * n,
            "classes": output.classes if output is not None else [],
            "scores": (
                np.ascontiguousarray(output.scores, dtype="<f8").tobytes()
                if output is not None
                else b""
            ),
            "errors": errors,
            "batch_sent_at_us": batch["sent_at_us"],
            "model_us": finished - started,
        }

    def wait_for_deploy(self) -> bool:
        """Follow the control topic until the model is deployed and its requests topic is
        there. A replica started before the control topic exists or before its model is
        deployed says so once and waits; False if ``stopping`` is set first."""
        follower = self.follower
        if not follower.wait_for_topic(self.stopping):
            return False
        follower.sync()
        follower.start()
        registry = follower.registry
        waited = registry.model(self.model) is None
        deployed = follower.wait_for(
            lambda: registry.model(self.model) is not None,
            self.stopping,
            f"model {self.model} is not deployed: waiting for "
            f"`clipstream model deploy {self.model} SOURCE`",
        )
        if not deployed:
            return False
        # deploy_model creates the topic before it records the model
        topics.wait_for_topics(
            AdminClient(self.settings.kafka()), [topics.model_requests(self.model)]
        )
        if waited:
            log.warning("model %s deployed: serving", self.model)
        return True

    def run(self) -> None:
        """Serve until ``stopping`` is set (SIGTERM sets it when run from the CLI)."""
        if not self.wait_for_deploy():
            self.follower.close()
            return
        self.warm()
        session_ms = group_session_timeout_ms(self.settings)
        consumer = Consumer(
            self.settings.kafka(
                **{
                    "group.id": topics.model_group(self.model),
                    "client.id": f"replica-{self.replica_id}",
                    "auto.offset.reset": "earliest",
                    # offsets are stored by hand once the answer is delivered (see class doc)
                    "enable.auto.offset.store": False,
                    "enable.auto.commit": True,
                    "auto.commit.interval.ms": 200,
                    "partition.assignment.strategy": "cooperative-sticky",
                    # a crashed replica's batches move to the others after this long
                    "session.timeout.ms": session_ms,
                    "heartbeat.interval.ms": max(100, session_ms // 4),
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                }
            )
        )
        producer = Producer(
            self.settings.kafka(
                **{"linger.ms": 0, "enable.idempotence": True, "client.id": self.replica_id}
            )
        )
        consumer.subscribe(
            [topics.model_requests(self.model)],
            on_assign=lambda c, parts: self.ready.set(),
        )
        try:
            while not self.stopping.is_set():
                for msg in consume_ready(consumer, 64, 0.05):
                    self._handle(msg, consumer, producer)
                producer.poll(0)
        finally:
            producer.flush(10)
            consumer.close()  # commits what was stored and leaves the group at once
            self.follower.close()

    def _handle(self, msg: Message, consumer: Consumer, producer: Producer) -> None:
        if msg.error():
            if msg.error().code() != KafkaError._PARTITION_EOF:
                log.warning("consume error: %s", msg.error())
            return
        try:
            batch = codec.decode("ModelBatch", msg.value())
        except codec.DecodeError as exc:
            self._dead_letter(producer, msg, str(exc))
            consumer.store_offsets(msg)
            return
        result = self.serve_batch(batch)

        def delivered(err: Any, _msg: Any, request: Message = msg) -> None:
            if err is None:
                try:
                    consumer.store_offsets(request)
                except KafkaException as exc:
                    # the partition moved meanwhile (a rebalance, a broker restart): its next
                    # owner serves the batch again and the worker drops the second answer
                    log.warning("offset of batch %s not stored: %s", batch["batch_id"], exc)
            else:
                log.error("answer to batch %s not delivered: %s", batch["batch_id"], err)

        produce(
            producer,
            topics.RESPONSES,
            codec.encode("ModelBatchResult", result),
            batch["batch_id"].encode(),
            partition=batch["reply_partition"],
            on_delivery=delivered,
        )
        self.batches_served += 1

    def _dead_letter(self, producer: Producer, msg: Message, reason: str) -> None:
        metrics.DEAD_LETTERS.labels("replica").inc()
        produce(
            producer,
            topics.DEADLETTER,
            encode_dead_letter(
                msg.topic(),
                msg.partition(),
                msg.offset(),
                msg.key(),
                msg.value(),
                reason,
                "replica",
            ),
        )


def serve_forever(replica: Replica) -> None:
    """Run a replica in the foreground; SIGTERM and SIGINT stop it cleanly."""

    def stop(signum: int, _frame: Any) -> None:
        replica.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    replica.run()
