"""The worker process: a serving loop, and a Faust app for the REST gateway.

* The serving loop (worker.serving) owns the query path and the learning: queries, model
  answers, feedback and observations of the partitions the serving group gives this
  worker, read with librdkafka in a thread of its own; it folds the observations of the
  selection keys on its partitions and writes their states to the selection table's
  changelog (clipstream.streams.learning.learner).
* The Faust app serves the REST gateway on its web server (clipstream.streams.gateway.server).

Every worker reads every key's selection state from the table's changelog
(learning.state_view), so queries of any app spread over all workers while each key's
state has one writer.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faust
from confluent_kafka.admin import AdminClient

from clipstream.models.control.registry import ControlFollower
from clipstream.streams.gateway.auth import server_ssl_context
from clipstream.streams.gateway.server import Gateway, mount
from clipstream.streams.runtime import metrics
from clipstream.streams.runtime.ports import free_port
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.worker.serving import ServingLoop

log = logging.getLogger("clipstream.worker")


class Worker:
    """Everything one worker process holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.require_bootstrap()
        self.admin = AdminClient(settings.kafka())
        topics.ensure_topics(self.admin, topics.TopicPlan(settings.partitions).core())
        self.sensor = metrics.Prometheus()
        self.follower = ControlFollower(settings, sensor=self.sensor)
        self.follower.sync()
        self.follower.start()
        self.registry = self.follower.registry
        self.serving = ServingLoop(settings, self.registry, self.sensor)
        # Faust serves the web only, the REST gateway (streams/gateway/server.py) on its aiohttp
        # server: the serving loop is the worker's one Kafka consumer and producer
        self.app = faust.App(
            topics.FAUST_APP,
            web_enabled=True,
            web_port=settings.web_port or free_port(),
            web_ssl_context=server_ssl_context(settings),
            # only the gateway: Faust's own pages would expose its internals
            web_tables_enabled=False,
            web_router_enabled=False,
            web_graph_enabled=False,
            web_stats_enabled=False,
        )
        # no Faust consumer (with no agents it would subscribe to nothing, which aiokafka
        # refuses) and no Faust producer (idle, it would only hold a connection)
        self.app.producer_only = True
        self.app.boot_strategy = self.app.BootStrategy(self.app, enable_kafka=False)
        self._closed = threading.Event()
        self._connect_lifecycle()
        self.gateway = Gateway(settings, self.registry)
        mount(self.app, self.gateway)

    def _connect_lifecycle(self) -> None:
        app = self.app

        @app.on_before_shutdown.connect
        async def shutting_down(app: Any, **kwargs: Any) -> None:
            self.serving.stop()

        @app.timer(1.0)
        async def watch_serving() -> None:
            if self.serving.stopped.is_set() and not self.serving.stopping.is_set():
                await app.crash(RuntimeError(f"the serving loop stopped: {self.serving.error!r}"))

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
