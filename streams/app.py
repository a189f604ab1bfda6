"""The Faust worker: partition ownership, the selection-state table and its changelog.

Faust gives each worker a set of co-partitioned partitions of the queries, responses and
feedback topics (all three have the same partition count), so one worker sees a query,
its models' answers and its feedback. The per-query work is done per chunk of messages by
``streams.pipeline``; Faust agents only hand chunks over and own the table writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from functools import partial
from typing import Any

import faust
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from models.registry import ControlFollower
from selection import SelectionState
from streams import codec, dedup, intake, metrics, topics
from streams.config import Settings
from streams.gateway import Gateway, free_port, mount
from streams.gateway_auth import server_ssl_context
from streams.pipeline import Pipeline, RawQuery, new_state, now_us

log = logging.getLogger("clipstream.worker")

TABLE = "selection"


class TableStateStore:
    """Selection state over the Faust table, with decoded objects kept in memory.

    Decoding the table's JSON for every query would cost more than the rest of intake, so
    decoded states are cached and the cache is dropped whenever partitions move."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.cache: dict[str, SelectionState] = {}

    def state_for(self, key: str, app: Any) -> SelectionState:
        state = self.cache.get(key)
        if state is None:
            stored = self.table.get(key)
            state = SelectionState.from_state(stored) if stored else new_state(app)
            self.cache[key] = state
        if state.models != list(app["models"]) or state.policy != app["policy"]:
            if state.policy != app["policy"]:
                state = self.cache[key] = new_state(app)
            else:
                state.sync_models(list(app["models"]))
        return state


class Worker:
    """Everything one worker process holds: the Faust app and the pipeline it feeds."""

    def __init__(self, settings: Settings, *, app_id: str = "clipstream") -> None:
        self.settings = settings
        bootstrap = settings.require_bootstrap()
        self.admin = AdminClient(settings.kafka())
        # Faust may not declare topics (topic_allow_declare=False), so the table's changelog
        # is created here with the same partition count as the topics it is co-partitioned
        # with; Faust checks that (PartitionsMismatch).
        changelog = NewTopic(
            f"{app_id}-{TABLE}-changelog",
            settings.partitions,
            1,
            config={"cleanup.policy": "compact"},
        )
        topics.ensure_topics(self.admin, [*topics.TopicPlan(settings.partitions).core(), changelog])
        self.follower = ControlFollower(settings)
        self.follower.sync()
        self.follower.start()
        self.producer = Producer(
            settings.kafka(
                **{
                    "linger.ms": 1,
                    "enable.idempotence": True,
                    "partitioner": "murmur2_random",
                    "client.id": f"{app_id}-worker",
                }
            )
        )
        self.app = faust.App(
            app_id,
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
            # a crashed worker's partitions move after 10 s, not Faust's default 60 s
            broker_session_timeout=10.0,
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
            # With streams.dedup a revoked partition's pending queries are dropped, not
            # awaited: their answers could not arrive while the revocation waits (flow is
            # stopped), so waiting would answer all of them with defaults at their deadline;
            # the partition's next owner answers them instead.
            stream_wait_empty=not settings.dedup,
        )
        self.table = self.app.Table(
            TABLE,
            default=None,
            partitions=settings.partitions,
            key_type=str,  # keys and values go through the changelog as JSON
        )
        self.states = TableStateStore(self.table)
        self.pipeline = Pipeline(settings, self.follower.registry, self.producer, self.states)
        self._wake = asyncio.Event()
        # streams.dedup: query partitions whose answered ids are restored, and query batches
        # held while a restore runs
        self._restored: set[int] = set()
        self._serving = asyncio.Event()
        self._serving.set()
        self._learning = asyncio.Event()
        self._learning.set()
        self._older: asyncio.Future[None] | None = None
        self._held: list[Any] = []
        self._closed = threading.Event()
        self._define_agents()
        if settings.bulk_intake:
            intake.install(self.app, {topics.QUERIES: self.on_query_messages})
        self.gateway = Gateway(settings, self.follower.registry)
        mount(self.app, self.gateway)

    def _define_agents(self) -> None:
        app, s, pipeline = self.app, self.settings, self.pipeline
        queries = topics.QUERIES
        queries_topic = app.topic(queries, partitions=s.partitions)
        responses = app.topic(topics.RESPONSES, partitions=s.partitions)
        feedback = app.topic(topics.FEEDBACK, partitions=s.partitions)

        @app.agent(queries_topic, name="intake")
        async def intake(stream: Any) -> None:
            # With the bulk intake (the default) the consumer hands query messages to
            # on_query_messages directly and this agent only declares the subscription.
            async for events in stream.take_events(s.intake_max, within=s.intake_wait_ms / 1000):
                for event in events:
                    # take_events acks the chunk when we return; this extra reference keeps
                    # the offset uncommitted until the query's prediction is delivered.
                    event.message.incref()
                self.on_query_messages([event.message for event in events])

        @app.agent(responses, name="merge")
        async def merge(stream: Any) -> None:
            async for event in stream.events():
                message = event.message
                try:
                    pipeline.on_result(message.value, message.partition, message.offset)
                except Exception as exc:  # a bad answer must not stop the merge agent
                    log.exception("merge failed")
                    pipeline.dead_letter(
                        topics.RESPONSES,
                        RawQuery(message.value, message.key, message.partition, message.offset),
                        f"internal error: {exc!r}",
                        "merge",
                    )
                self._wake.set()

        @app.agent(feedback, name="feedback")
        async def learn(stream: Any) -> None:
            async for event in stream.events():
                message = event.message
                if not self._learning.is_set():
                    await self._learning.wait()  # answers are being restored (streams.dedup)
                    if message.generation_id != app.consumer_generation_id:
                        continue  # a rebalance came meanwhile: the next owner reads it again
                try:
                    self.on_feedback(message)
                except Exception as exc:  # nor a bad feedback record the feedback agent
                    log.exception("feedback failed")
                    pipeline.dead_letter(
                        topics.FEEDBACK,
                        RawQuery(message.value, message.key, message.partition, message.offset),
                        f"internal error: {exc!r}",
                        "feedback",
                    )

        @app.task
        async def ticker() -> None:
            # Batch windows and deadlines fire from here, not from message arrival.
            while not app.should_stop:
                wake = pipeline.tick()
                delay = 0.005 if wake is None else (wake - now_us()) / 1e6
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), max(0.0005, min(delay, 0.005)))

        @app.on_partitions_revoked.connect
        async def revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
            self.states.cache.clear()
            if s.dedup:
                self.let_go({tp.partition for tp in revoked if tp.topic == queries})

        @app.on_before_shutdown.connect
        async def shutting_down(app: Any, **kwargs: Any) -> None:
            if s.dedup:
                self.let_go(set(range(s.partitions)))

        @app.on_partitions_assigned.connect
        async def assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
            self.states.cache.clear()
            if s.dedup:
                await self.restore({tp.partition for tp in assigned if tp.topic == queries})

    def let_go(self, partitions: set[int]) -> None:
        """Query partitions this worker no longer serves: drop their unanswered queries
        (unacknowledged, so the next owner reads and answers them) and deliver every
        prediction already produced, so that the next owner's restore finds it."""
        self._held = [m for m in self._held if m.partition not in partitions]
        dropped = self.pipeline.drop_partitions(partitions)
        left = self.producer.flush(30)
        log.info("let go of %s: %d pending queries dropped", sorted(partitions), dropped)
        if left:
            log.error("%d predictions not delivered before letting go of partitions", left)

    async def restore(self, partitions: set[int]) -> None:
        """Before serving newly assigned query partitions, learn which of their queries were
        answered (and with what) from the predictions topic (streams.dedup). Queries wait
        only for the recent predictions a redelivered query can have; feedback also waits
        for the older ones its answer memory needs, read in the background. Partitions kept
        through a rebalance need nothing: this worker produced their predictions."""
        new = partitions - self._restored
        self._restored = set(partitions)
        if not new:
            return
        if self._older is not None:
            await self._older  # one restore at a time
        group = self.app.conf.id
        self._serving.clear()
        self._learning.clear()
        older: dict[int, tuple[int, int]] = {}
        try:
            plan = await asyncio.to_thread(dedup.plan, self.settings, new, group)
            older = plan.older
            await self._restore_range(plan.recent, new, "recent")
        except Exception:
            # serving on is better than stopping; a redelivered query may then be answered
            # twice, which the SDK's reader still removes
            log.exception("restoring answered queries of %s failed", sorted(new))
        finally:
            self._serving.set()
            held, self._held = self._held, []
            if held:
                self.on_query_messages(held)
        self._older = asyncio.ensure_future(self._restore_older(older, new))

    async def _restore_older(self, ranges: dict[int, tuple[int, int]], new: set[int]) -> None:
        try:
            await self._restore_range(ranges, new, "older")
        except Exception:
            log.exception("restoring the answer memory of %s failed", sorted(new))
        finally:
            self._learning.set()
            self._older = None

    async def _restore_range(
        self, ranges: dict[int, tuple[int, int]], new: set[int], what: str
    ) -> None:
        found, done = await asyncio.to_thread(
            dedup.read, self.settings, ranges, self.app.conf.id, self.pipeline.registry
        )
        for qid, remembered in found:
            self.pipeline.restore(qid, remembered)
        log.warning(
            "restored %d %s predictions of partitions %s in %.2f s",
            done.predictions,
            what,
            sorted(new),
            done.seconds,
        )

    def on_query_messages(self, messages: list[Any]) -> None:
        if not self._serving.is_set():
            self._held.extend(messages)
            return
        consumer = self.app.consumer
        raws = [
            RawQuery(m.value, m.key, m.partition, m.offset, partial(m.ack, consumer))
            for m in messages
        ]
        started = now_us()
        self.pipeline.on_queries(raws, started)
        per_query = (now_us() - started) / 1e6 / len(raws)
        metrics.STAGE_LATENCY.labels("intake").observe(per_query)
        self._wake.set()

    def on_feedback(self, message: Any) -> None:
        """Apply one feedback record to the selection state of its key (a table write)."""
        pipeline = self.pipeline
        raw = RawQuery(message.value, message.key, message.partition, message.offset)
        if codec.kind_of(message.value, ("SelectionSnapshot",)):
            try:
                self.install_snapshot(codec.decode("SelectionSnapshot", message.value))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # DecodeError too
                reason = f"invalid selection snapshot: {type(exc).__name__}: {exc}"
                pipeline.dead_letter(topics.FEEDBACK, raw, reason, "feedback")
            return
        try:
            fb = codec.decode("Feedback", message.value)
        except codec.DecodeError as exc:
            pipeline.dead_letter(topics.FEEDBACK, raw, str(exc), "feedback")
            metrics.FEEDBACK.labels("?", "invalid").inc()
            return
        remembered = pipeline.recall(fb["query_id"])
        app = pipeline.registry.app(fb["app"])
        reason = None
        if remembered is None:
            reason = f"feedback for unknown or expired query {fb['query_id']!r}"
        elif app is None:
            reason = f"feedback for unknown app {fb['app']!r}"
        elif fb["app"] != remembered.app:  # else it would reshape another app's state
            reason = (
                f"feedback names app {fb['app']!r}; query {fb['query_id']!r} was for app "
                f"{remembered.app!r}"
            )
        elif fb["label"] is None and fb["reward"] is None:
            reason = "feedback carries neither a label nor a reward"
        elif fb["label"] is None and not 0.0 <= fb["reward"] <= 1.0:  # also NaN
            reason = f"reward must be a number in [0, 1], got {fb['reward']}"
        if reason is not None:
            metrics.FEEDBACK.labels(pipeline.app_label(fb["app"]), "rejected").inc()
            pipeline.dead_letter(topics.FEEDBACK, raw, reason, "feedback", fb["query_id"])
            return
        assert remembered is not None and app is not None
        state = self.states.state_for(remembered.key, app)
        if not state.should_apply(message.partition, message.offset):
            metrics.FEEDBACK.labels(pipeline.app_label(fb["app"]), "replayed").inc()
            return
        state.learn(remembered.labels, fb["label"], remembered.probs, reward=fb["reward"])
        state.mark_applied(message.partition, message.offset)
        self.table[remembered.key] = state.to_state()
        metrics.FEEDBACK.labels(pipeline.app_label(fb["app"]), "applied").inc()
        for model, weight in state.weights().items():
            metrics.BANDIT_WEIGHT.labels(remembered.key, model).set(weight)

    def install_snapshot(self, snapshot: dict[str, Any]) -> None:
        """A replayed state replaces the key's state (a table write, so it is durable)."""
        state = SelectionState.from_state(json.loads(snapshot["state"]))
        self.table[snapshot["key"]] = state.to_state()
        self.states.cache[snapshot["key"]] = state
        metrics.FEEDBACK.labels(snapshot["app"], "snapshot").inc()
        for model, weight in state.weights().items():
            metrics.BANDIT_WEIGHT.labels(snapshot["key"], model).set(weight)

    def count_replicas(self) -> None:
        """Live replicas per model, from their consumer groups' members."""
        models = list(self.pipeline.registry.models)
        if not models:
            return
        groups = [topics.model_group(m) for m in models]
        for model, future in zip(
            models, self.admin.describe_consumer_groups(groups).values(), strict=True
        ):
            try:
                self.pipeline.replicas[model] = len(future.result(5).members)
            except Exception as exc:  # a group not yet formed counts as unknown
                log.debug("replica count for %s: %s", model, exc)

    def _watch_replicas(self) -> None:
        while not self._closed.wait(2.0):
            try:
                self.count_replicas()
            except Exception:
                log.exception("counting replicas failed")

    def start_background(self) -> None:
        threading.Thread(target=self._watch_replicas, name="replicas", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        self.gateway.close()
        self.producer.flush(10)
        self.follower.close()


def run_worker(settings: Settings, loglevel: str = "warn") -> None:
    """Run a worker in the foreground until SIGTERM/SIGINT."""
    from faust.worker import Worker as FaustWorker

    port = metrics.serve(settings.metrics_port)
    log.warning("metrics on :%d", port)
    worker = Worker(settings)
    log.warning("REST gateway on :%d (%s)", worker.app.conf.web_port, worker.gateway.describe())
    worker.start_background()
    try:
        FaustWorker(worker.app, loglevel=loglevel, quiet=True).execute_from_commandline()
    finally:
        worker.close()
