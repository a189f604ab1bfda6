"""The worker process: a serving loop, and the REST gateway on an aiohttp web server.

* The serving loop (worker.serving) owns the query path and the learning: queries, model
  answers, feedback and observations of the partitions the serving group gives this
  worker, read with librdkafka in a thread of its own; it folds the observations of the
  selection keys on its partitions and writes their states to the selection table's
  changelog (clipstream.streams.learning.learner).
* An asyncio loop of the main thread serves the REST gateway with aiohttp
  (clipstream.streams.gateway.server); it also takes SIGTERM and SIGINT, and ends the
  process when the serving loop stops on its own.

Every worker reads every key's selection state from the table's changelog
(learning.state_view), so queries of any app spread over all workers while each key's
state has one writer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading

from confluent_kafka.admin import AdminClient

from clipstream.models.control.registry import ControlFollower
from clipstream.streams.gateway.auth import server_ssl_context
from clipstream.streams.gateway.clipper import ClipperServer
from clipstream.streams.gateway.server import Gateway, WebServer
from clipstream.streams.runtime import metrics
from clipstream.streams.wire import topics
from clipstream.streams.wire.config import Settings
from clipstream.streams.worker.serving import ServingLoop

log = logging.getLogger("clipstream.worker")

#: run_worker's ``loglevel``: the level of aiohttp's loggers (the web server's own)
WEB_LOG_LEVELS = {
    "crit": logging.CRITICAL,
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
}


class Worker:
    """Everything one worker process holds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.require_bootstrap()
        self.admin = AdminClient(settings.kafka())
        topics.ensure_topics(self.admin, topics.TopicPlan.of(settings).core())
        self.sensor = metrics.Prometheus()
        self.follower = ControlFollower(settings, sensor=self.sensor)
        self.follower.sync()
        self.follower.start()
        self.registry = self.follower.registry
        self.serving = ServingLoop(settings, self.registry, self.sensor)
        ssl_context = server_ssl_context(settings)
        self._closed = threading.Event()
        self.gateway = Gateway(settings, self.registry)
        self.web = WebServer(self.gateway, settings, ssl_context)
        replicas = self.serving.pipeline.dispatch.replicas
        self.clipper = ClipperServer(self.gateway, settings, ssl_context, replicas)

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

    async def serve(self) -> BaseException | None:
        """Serve the REST gateway and run the serving loop until SIGTERM or SIGINT (None),
        or until the serving loop stops on its own (its error)."""
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._signalled, signum, done)
        failed = False
        port = await self.web.start()
        try:
            log.warning("REST gateway on :%d (%s)", port, self.gateway.describe())
            clipper_port = await self.clipper.start()
            if clipper_port is not None:
                log.warning("Clipper REST frontend on :%d", clipper_port)
            self.start()
            # a thread of its own waits on the serving loop: no timer wakes this loop
            threading.Thread(
                target=self._watch_serving, args=(loop, done), name="serving-watch", daemon=True
            ).start()
            await done.wait()
            failed = not self.serving.stopping.is_set() and self.serving.stopped.is_set()
            # no new connections; the serving loop drains (it answers the queries it holds,
            # so REST calls waiting for them still get their predictions), commits and
            # leaves its group
            await self.web.stop_listening()
            await self.clipper.stop_listening()
            await asyncio.to_thread(self.serving.stop)
        finally:
            await self.clipper.close()
            await self.web.close()
        if failed:
            return self.serving.error or RuntimeError("no error given")
        return None

    def _signalled(self, signum: int, done: asyncio.Event) -> None:
        log.info("%s: stopping", signal.Signals(signum).name)
        done.set()

    def _watch_serving(self, loop: asyncio.AbstractEventLoop, done: asyncio.Event) -> None:
        self.serving.stopped.wait()
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker stopped
            loop.call_soon_threadsafe(done.set)

    def close(self) -> None:
        self._closed.set()
        self.serving.stop()
        self.gateway.close()
        self.follower.close()


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT (then return, the serving loop
    drained and its offsets committed). If the serving loop stops on its own, raise its
    error (the command exits with 1). ``loglevel`` (crit, error, warn, info, debug) is the
    level of aiohttp's loggers."""
    logging.getLogger("aiohttp").setLevel(WEB_LOG_LEVELS[loglevel])
    port = metrics.serve(settings.metrics_port)
    log.warning("metrics on :%d", port)
    worker = Worker(settings)
    try:
        error = asyncio.run(worker.serve())
    finally:
        worker.close()
    if error is not None:
        # the serving loop logged its traceback; the command line says the error in one line
        log.error("the serving loop stopped on its own: %r", error)
        if isinstance(error, Exception):
            raise error
        raise RuntimeError(f"the serving loop stopped: {error!r}") from error
