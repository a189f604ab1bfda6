"""The worker process: a serving loop and a Faust app.

* The serving loop (streams.serving) owns the query path: queries, model answers and
  feedback of the partitions the serving group gives this worker, read with librdkafka in
  a thread of its own.
* The Faust app owns the learning: the partitions of clipstream.observations Faust
  assigns this worker, the selection table of the keys on them and its changelog
  (streams.learning), and the REST gateway on Faust's web server (streams.gateway).

Every worker reads every key's selection state from the table's changelog
(streams.state_view), so queries of any app spread over all workers while each key's
state has one writer.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faust
from confluent_kafka.admin import AdminClient

from models.registry import ControlFollower
from streams import faust_bulk, metrics, topics
from streams.config import Settings
from streams.gateway import Gateway, free_port, mount
from streams.gateway_auth import server_ssl_context
from streams.learning import Learner, Record
from streams.serving import ServingLoop

log = logging.getLogger("clipstream.worker")

#: how often folded selection states are written to the table (and so reach every worker)
LEARN_FLUSH_S = 0.05


class SelectionTable(faust.Table):
    """The selection table: a key's changelog partition is its observations' partition
    (topics.partition_for), so the worker folding a key's observations owns its state,
    whichever event a write happens in (streams.learning writes once per fetched batch)."""

    def partition_for_key(self, key: Any) -> int | None:
        return topics.partition_for(bytes(key).decode("utf-8", "replace"), self.partitions)


class Worker:
    """Everything one worker process holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        bootstrap = settings.require_bootstrap()
        self.admin = AdminClient(settings.kafka())
        topics.ensure_topics(self.admin, topics.TopicPlan(settings.partitions).core())
        self.sensor = metrics.Prometheus()
        self.follower = ControlFollower(settings, sensor=self.sensor)
        self.follower.sync()
        self.follower.start()
        self.registry = self.follower.registry
        self.serving = ServingLoop(settings, self.registry, self.sensor)
        self.app = faust.App(
            topics.FAUST_APP,
            broker=[f"kafka://{h}" for h in bootstrap.split(",")],
            broker_credentials=settings.faust_broker_credentials(),
            store="memory://",
            topic_partitions=settings.partitions,
            topic_allow_declare=False,
            topic_disable_leader=True,
            key_serializer="raw",
            value_serializer="raw",
            consumer_auto_offset_reset="earliest",
            broker_commit_interval=0.2,
            # learning pauses while a crashed worker's observation partitions move; queries
            # do not (they are the serving group's)
            broker_session_timeout=6.0,
            broker_heartbeat_interval=1.0,
            # the REST gateway (streams/gateway.py) is served by Faust's aiohttp web server
            web_enabled=True,
            web_port=free_port(settings.web_port),
            web_ssl_context=server_ssl_context(settings),
            # only the gateway: Faust's own pages would expose table contents and stats
            web_tables_enabled=False,
            web_router_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
            table_standby_replicas=0,
        )
        self.table = self.app.tables.add(
            SelectionTable(
                self.app,
                name=topics.SELECTION_TABLE,
                default=None,
                beacon=self.app.tables.beacon,
                partitions=settings.partitions,
                # keys as their plain UTF-8 bytes (the observations' keys), values as JSON
                key_type=bytes,
            )
        )
        self.learner = Learner(self.table, self.registry, self.sensor, self._dead_letter)
        #: observations folded in, to acknowledge once their states are written
        self._unwritten: list[Any] = []
        self._closed = threading.Event()
        self._define_agents()
        if settings.bulk_learn:
            faust_bulk.install(
                self.app,
                {topics.OBSERVATIONS: self.on_observation_messages},
                before_wait_empty=self.flush_learning,
            )
        self.gateway = Gateway(settings, self.registry)
        mount(self.app, self.gateway)

    def _define_agents(self) -> None:
        app = self.app
        observations = app.topic(topics.OBSERVATIONS, partitions=self.settings.partitions)

        @app.agent(observations, name="learn")
        async def learn(stream: Any) -> None:
            if self.settings.bulk_learn:
                # the consumer hands observations to on_observation_messages; this agent
                # only declares the subscription (and waits without a timer: take's
                # `within` woke the event loop 100 times a second for nothing)
                async for _event in stream.events():
                    pass
                return
            async for events in stream.take_events(1000, within=0.05):
                self.learner.apply(
                    [
                        (e.message.key, e.message.value, e.message.partition, e.message.offset)
                        for e in events
                    ]
                )
                self.learner.flush()  # take_events acknowledges the chunk when we return

        @app.timer(LEARN_FLUSH_S)
        async def write_states() -> None:
            self.flush_learning()

        @app.on_partitions_revoked.connect
        async def revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
            self.flush_learning()
            self.learner.forget()

        @app.on_partitions_assigned.connect
        async def assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
            self.learner.forget()

        @app.on_before_shutdown.connect
        async def shutting_down(app: Any, **kwargs: Any) -> None:
            self.serving.stop()

        @app.timer(1.0)
        async def watch_serving() -> None:
            if self.serving.stopped.is_set() and not self.serving.stopping.is_set():
                await app.crash(RuntimeError(f"the serving loop stopped: {self.serving.error!r}"))

    def on_observation_messages(self, messages: list[Any]) -> None:
        self.learner.apply([(m.key, m.value, m.partition, m.offset) for m in messages])
        self._unwritten.extend(messages)
        if len(self._unwritten) >= 1000:
            self.flush_learning()

    def flush_learning(self) -> None:
        """Write the states folded into since the last time, then acknowledge their
        observations: Faust's commit flushes its producer (the table's changelog) before
        it commits their offsets, so an acknowledged observation is never lost."""
        if not self._unwritten:
            return
        messages, self._unwritten = self._unwritten, []
        self.learner.flush()
        consumer = self.app.consumer
        for m in messages:
            m.ack(consumer)

    def _dead_letter(self, record: Record, reason: str) -> None:
        key, value, partition, offset = record
        self.serving.pipeline.emitter.dead_letter(
            topics.OBSERVATIONS, partition, offset, key, value, reason, "learn"
        )

    def count_replicas(self) -> None:
        """Live replicas per model, from their consumer groups' members."""
        models = list(self.registry.models)
        if not models:
            return
        groups = [topics.model_group(m) for m in models]
        replicas = self.serving.pipeline.dispatch.replicas
        for model, future in zip(
            models, self.admin.describe_consumer_groups(groups).values(), strict=True
        ):
            try:
                replicas[model] = len(future.result(5).members)
            except Exception as exc:  # a group not yet formed counts as unknown
                log.debug("replica count for %s: %s", model, exc)

    def _watch_replicas(self) -> None:
        while not self._closed.wait(2.0):
            try:
                self.count_replicas()
            except Exception:
                log.exception("counting replicas failed")

    def start(self) -> None:
        self.serving.start()
        threading.Thread(target=self._watch_replicas, name="replicas", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.serving.stop()
        self.gateway.close()
        self.follower.close()


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT."""
    from faust.worker import Worker as FaustWorker

    port = metrics.serve(settings.metrics_port)
    log.warning("metrics on :%d", port)
    worker = Worker(settings)
    log.warning("REST gateway on :%d (%s)", worker.app.conf.web_port, worker.gateway.describe())
    worker.start()
    try:
        faust_worker = FaustWorker(worker.app, loglevel=loglevel, quiet=True)
        if not faust_worker.stdout.isatty():
            faust_worker.spinner = None  # it writes cursor escape codes even into a log file
        faust_worker.execute_from_commandline()
    finally:
        worker.close()
