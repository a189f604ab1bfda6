"""The serving loop: one thread that owns the worker's query path and its learning.

Its consumer is a member of the serving group (``clipstream-serving``) subscribed to the
queries, responses, feedback and observations topics with the range assignor, which gives
a member the same partition numbers of all four: a query, its model answers and its
feedback meet in one worker, and the observations of the selection keys on that partition
number are folded there (learning.learner: one writer per key). Feedback and observations
stay paused on this consumer: the worker's learning feed reads them in batches, with the
selection changelog (clipstream.streams.learning.feed), and this loop handles and commits them.
librdkafka keeps the membership from its own threads, so a busy Python loop never misses
a heartbeat, and a crashed worker's partitions move after the session timeout (seconds).
The thread blocks in ``poll`` until a message arrives or the next deadline or batch
window is due, runs the pipeline and what the learning feed has fetched, and commits, in
this one place, the offsets whose results Kafka already has (clipstream.streams.worker.offsets).

Rebalances (eager, as the range assignor is): revoked partitions are frozen, the producer
is flushed and their offsets committed; on assignment, partitions kept go on from where
this worker was, partitions given up are dropped (their next owner reads their
unanswered queries again), and new ones are served once the predictions already made for
them are read back (clipstream.streams.worker.dedup), so no query is answered twice."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from clipstream.models.control.registry import Registry
from clipstream.streams.learning.feed import LEARNED, LearningFeed
from clipstream.streams.learning.learner import ChangelogStore, Learner, Record
from clipstream.streams.learning.state_view import StateView
from clipstream.streams.runtime import heap
from clipstream.streams.wire import topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.wire.config import Settings
from clipstream.streams.wire.kafka import FETCH_WAIT_MS, consume_ready, group_session_timeout_ms
from clipstream.streams.wire.sensors import Sensor
from clipstream.streams.worker import dedup
from clipstream.streams.worker.emit import PRODUCER_CONFIG
from clipstream.streams.worker.handover import Handover
from clipstream.streams.worker.pipeline import Pipeline

log = logging.getLogger("clipstream.serving")

SERVED = (topics.QUERIES, topics.RESPONSES, topics.FEEDBACK, topics.OBSERVATIONS)
COMMIT_INTERVAL_S = 0.1
#: learning records handled per turn of the loop at most: a batch of feedback must not
#: hold up the queries that arrive while it is handled (~50 us of this thread each)
LEARN_CHUNK = 256
#: longest wait in poll when nothing is due (keeps shutdown and idle checks prompt)
IDLE_POLL_S = 0.1
#: a clean stop waits this long at most for pending queries to be answered
DRAIN_S = 2.0
#: the first pause before a failed restore is tried again, and the longest
RESTORE_RETRY_S = 0.5
RESTORE_RETRY_MAX_S = 5.0


class ServingLoop:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        sensor: Sensor | None = None,
        *,
        group: str = topics.SERVING_GROUP,
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sensor = sensor or Sensor()
        self.group = group
        self.client_id = client_id or f"clipstream-worker-{uuid.uuid4().hex[:8]}"
        self.producer = Producer(
            settings.kafka(
                **{
                    **PRODUCER_CONFIG,
                    "linger.ms": 1,
                    "partitioner": "murmur2_random",
                    "client.id": self.client_id,
                }
            )
        )
        self.view = StateView()
        self.feed = LearningFeed(
            settings,
            self.view,
            group=group,
            batch_ms=settings.learn_batch_ms,
            on_staleness=self.sensor.on_state_staleness,
        )
        self.pipeline = Pipeline(settings, registry, self.producer, self.view, sensor=self.sensor)
        self.handover = Handover(self.pipeline, restore=settings.dedup)
        self.learner = Learner(
            ChangelogStore(self.view, self.pipeline.emitter, settings.partitions),
            registry,
            self.sensor,
            self._learn_dead_letter,
        )
        self.pipeline.emitter.on_observation = self._made
        #: observation partitions (and where to read them from) not read until the
        #: changelog is read to their end offsets (None until a thread of its own has asked
        #: the broker for them)
        self._catching_up: dict[int, int | None] = {}
        self._changelog_ends: dict[int, int] | None = None
        self._assignments = 0
        self._ends: queue.SimpleQueue[tuple[int, dict[int, int]]] = queue.SimpleQueue()
        self.consumer: Consumer | None = None
        self.session_timeout_ms = settings.session_timeout_ms
        self.stopping = threading.Event()
        self.ready = threading.Event()  # assigned and serving at least once
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="serving", daemon=True)
        self._restores: queue.SimpleQueue[tuple[int, str, set[int], list[Any], float]] = (
            queue.SimpleQueue()
        )
        self._next_commit = 0.0
        self.error: BaseException | None = None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        self.stopping.set()
        self.thread.join(timeout)

    def _consumer(self) -> Consumer:
        return Consumer(
            self.settings.kafka(
                **{
                    "group.id": self.group,
                    "client.id": self.client_id,
                    "partition.assignment.strategy": "range",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                    "session.timeout.ms": self.session_timeout_ms,
                    "heartbeat.interval.ms": max(100, self.session_timeout_ms // 4),
                    "fetch.wait.max.ms": FETCH_WAIT_MS,
                    "enable.partition.eof": False,
                    "on_commit": self._on_commit,
                }
            )
        )

    def _run(self) -> None:
        try:
            self.session_timeout_ms = group_session_timeout_ms(self.settings)
            read = self.feed.catch_up()
            log.info("selection states read: %d records, %d keys", read, len(self.view))
            log.info("%d objects loaded and exempt from garbage collection", heap.freeze_loaded())
            self.consumer = self._consumer()
            self._subscribe()
            self._loop()
        except BaseException as exc:  # the worker process reports it and exits
            self.error = exc
            log.exception("serving loop failed")
        finally:
            self.stopped.set()

    def _subscribe(self) -> None:
        assert self.consumer is not None
        self.consumer.subscribe(
            list(SERVED),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def _loop(self) -> None:
        consumer, pipeline = self.consumer, self.pipeline
        assert consumer is not None
        wake: int | None = None
        while not self.stopping.is_set():
            now = now_us()
            timeout = IDLE_POLL_S if wake is None else min(IDLE_POLL_S, max(0, wake - now) / 1e6)
            if self.feed.behind:
                timeout = 0.0
            messages = consume_ready(consumer, 2000, timeout)
            if messages:
                self._handle(messages)
            learned = self.feed.drain(LEARN_CHUNK)
            if learned:
                self._handle(learned)
            self._apply_restores()
            self._resume_learning()
            wake = pipeline.tick(now_us())
            self.producer.poll(0)
            self.pipeline.emitter.check()  # before a commit could pass what it lost
            self._maybe_commit()
        self._drain_and_close()

    def _handle(self, messages: list[Any]) -> None:
        queries, results, feedback, observations = [], [], [], []
        for msg in messages:
            err = msg.error()
            if err is not None:
                self._on_error(err)
                continue
            topic = msg.topic()
            if topic == topics.QUERIES:
                queries.append(msg)
            elif topic == topics.RESPONSES:
                results.append(msg)
            elif topic == topics.FEEDBACK:
                feedback.append(msg)
            else:
                observations.append(msg)
        now = now_us()
        if results:
            self.pipeline.on_results(results, now)
        if queries:
            self.pipeline.on_queries(queries, now)
        if feedback:
            self.pipeline.on_feedback(feedback, now)
        if observations:
            self._learn(observations)

    # -- learning -----------------------------------------------------------------------

    def _learn(self, messages: list[Any]) -> None:
        read = self.pipeline.offsets.read
        records: list[Record] = []
        for msg in messages:
            partition, offset = msg.partition(), msg.offset()
            read(topics.OBSERVATIONS, partition, offset)
            records.append((msg.key(), msg.value(), partition, offset))
        # the feed hands observations over a fetched batch at a time: each key's state is
        # written once per batch
        self.learner.apply(records)
        self.learner.flush()

    def _made(self, partition: int, value: bytes, observations: list[dict[str, Any]]) -> None:
        if partition in self.feed.owned:  # read back here, and folded
            self.learner.made(value, observations)

    def _resume_learning(self) -> None:
        """Observation partitions assigned here are folded once this worker's view holds
        every state written to them before (by their previous owner, or by this worker)."""
        if not self._catching_up:
            return
        while not self._ends.empty():
            assignment, ends = self._ends.get_nowait()
            if assignment == self._assignments:
                self._changelog_ends = ends
        if self._changelog_ends is None or not self.feed.caught_up(self._changelog_ends):
            return
        partitions, self._catching_up = self._catching_up, {}
        self.feed.read(topics.OBSERVATIONS, partitions)
        self.feed.own(partitions)
        log.info("learning on observation partitions %s", sorted(partitions))

    def _ask_changelog_ends(self, assignment: int, partitions: list[int]) -> None:
        """In a thread of its own: a broker round trip must not hold up the queries of a
        partition just taken over."""
        while not self.stopping.is_set() and assignment == self._assignments:
            try:
                self._ends.put((assignment, self.feed.end_offsets(partitions)))
                return
            except (KafkaException, TimeoutError) as exc:  # the broker is away: ask again
                log.warning("changelog end offsets not known yet: %s", exc)
                self.stopping.wait(0.5)

    def _give_up_learning(self) -> None:
        """The observation partitions may be another worker's now: nothing folded here is
        written, and the changelog is the truth for every key again."""
        self.learner.drop()
        self.view.disown()
        self.feed.disown(self.pipeline.emitter.states_written)

    def _learn_dead_letter(self, record: Record, reason: str) -> None:
        key, value, partition, offset = record
        source = (topics.OBSERVATIONS, partition, offset)
        self.pipeline.emitter.dead_letter(
            topics.OBSERVATIONS, partition, offset, key, value, reason, "learn", done=source
        )

    def _on_error(self, err: KafkaError) -> None:
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("consume error: %s", err)

    # -- offsets ------------------------------------------------------------------------

    def _maybe_commit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_commit:
            return
        self._next_commit = now + COMMIT_INTERVAL_S
        offsets = self.pipeline.offsets.to_commit()
        if not offsets or self.consumer is None:
            return
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            if force:
                self.consumer.commit(offsets=tps, asynchronous=False)
                self.pipeline.offsets.mark_committed(offsets)
            else:
                self.consumer.commit(offsets=tps, asynchronous=True)
        except Exception as exc:  # e.g. a rebalance is under way: the next commit retries
            self.sensor.on_commit_failed()
            log.info("commit of %d offsets not done: %s", len(tps), exc)

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        if err is not None and err.code() != KafkaError._NO_OFFSET:
            # the offsets stay uncommitted and go with the next commit; a takeover before
            # then redoes their inputs (de-duplicated), so this is a delay, not a loss
            self.sensor.on_commit_failed()
            log.warning("commit of %d offsets failed: %s", len(partitions), err)
            return
        if err is not None:
            return
        self.pipeline.offsets.mark_committed(
            {(tp.topic, tp.partition): tp.offset for tp in partitions if tp.error is None}
        )

    # -- rebalances ---------------------------------------------------------------------

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        revoked = {tp.partition for tp in partitions if tp.topic == topics.QUERIES}
        # their next owner reads feedback and observations on from the commit below
        self.feed.stop_reading()
        self.handover.revoked(revoked)
        left = self.producer.flush(10)
        if left:
            log.error("%d records not delivered before partitions were revoked", left)
        self._maybe_commit(force=True)
        log.warning("partitions revoked: %s", sorted(revoked))

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        lost = {tp.partition for tp in partitions if tp.topic == topics.QUERIES}
        dropped = self.handover.lost(lost)
        self.feed.stop_reading()
        self._give_up_learning()
        log.warning("partitions lost: %s (%d pending queries dropped)", sorted(lost), dropped)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned = {tp.partition for tp in partitions if tp.topic == topics.QUERIES}
        plan = self.handover.assigned(assigned, now_us())
        offsets = self.pipeline.offsets
        placed = []
        for tp in partitions:
            # a partition kept goes on from where this worker was, not from its last commit
            position = (
                offsets.position(tp.topic, tp.partition) if tp.partition in plan.kept else None
            )
            placed.append(
                TopicPartition(tp.topic, tp.partition, position) if position is not None else tp
            )
        consumer.assign(placed)
        # librdkafka keeps a partition's pause across assign(): partitions served on must not
        # stay paused from a restore an earlier rebalance cut short; feedback and
        # observations are the learning feed's to read
        consumer.resume(
            [tp for tp in placed if tp.partition not in plan.new and tp.topic not in LEARNED]
        )
        consumer.pause([tp for tp in placed if tp.topic in LEARNED])
        where = {(tp.topic, tp.partition): tp.offset for tp in placed}

        def start(topic: str, ps: set[int] | list[int]) -> dict[int, int | None]:
            return {p: where[topic, p] if where[topic, p] >= 0 else None for p in ps}

        waiting = set(plan.new) if self.settings.dedup else set()
        feedback = [
            tp.partition
            for tp in partitions
            if tp.topic == topics.FEEDBACK and tp.partition not in waiting
        ]
        self.feed.read(topics.FEEDBACK, start(topics.FEEDBACK, feedback))
        # learning starts from the states last written: this worker's own were written at
        # the revocation; its view reads the changelog to its end first
        self._give_up_learning()
        learning = sorted(tp.partition for tp in partitions if tp.topic == topics.OBSERVATIONS)
        self._assignments += 1
        self._catching_up = start(topics.OBSERVATIONS, learning)
        self._changelog_ends = None
        if learning:
            threading.Thread(
                target=self._ask_changelog_ends,
                args=(self._assignments, learning),
                name="changelog-ends",
                daemon=True,
            ).start()
        if waiting:
            # queries wait for the predictions already made for them; feedback waits for the
            # answers it needs as well
            consumer.pause([TopicPartition(topics.QUERIES, p) for p in waiting])
            threading.Thread(
                target=self._restore,
                args=(plan.epoch, waiting),
                name="restore",
                daemon=True,
            ).start()
        log.warning(
            "partitions assigned: %s (kept %s, new %s; given up %s, %d pending dropped)",
            sorted(assigned),
            sorted(plan.kept),
            sorted(plan.new),
            sorted(plan.lost),
            plan.dropped,
        )
        self.ready.set()

    def _restore(self, epoch: int, partitions: set[int]) -> None:
        """In a thread of its own (blocking reads): what was answered for ``partitions``.

        A read that fails (a broker dying under it) is tried again until it succeeds or a
        newer assignment makes it moot: serving a partition with an empty memory would
        answer its redelivered queries twice and refuse their feedback, so the partition
        rather stays paused, as Kafka leaves a partition without a leader unavailable."""
        key_of = dedup.key_function(self.registry)
        recent_done = False
        pause_s = RESTORE_RETRY_S
        while not self.stopping.is_set() and self.handover.epoch == epoch:
            try:
                plan = dedup.plan(self.settings, partitions, self.group)
                if not recent_done:
                    found, done = dedup.read(self.settings, plan.recent, self.group, key_of)
                    self.sensor.on_restore(done.seconds)
                    self._restores.put((epoch, "recent", partitions, found, done.seconds))
                    recent_done = True
                older, done = dedup.read(self.settings, plan.older, self.group, key_of)
                self._restores.put((epoch, "older", partitions, older, done.seconds))
                return
            except Exception as exc:
                log.warning(
                    "restoring answered queries of %s failed (%s): trying again in %.1f s",
                    sorted(partitions),
                    exc,
                    pause_s,
                )
                self.stopping.wait(pause_s)
                pause_s = min(pause_s * 2, RESTORE_RETRY_MAX_S)

    def _apply_restores(self) -> None:
        while True:
            try:
                epoch, what, partitions, found, seconds = self._restores.get_nowait()
            except queue.Empty:
                return
            if self.consumer is None or not self.handover.restored(
                epoch, what == "recent", partitions, found
            ):
                continue  # another rebalance came: its own restore covers these partitions
            if what == "recent":
                self.consumer.resume([TopicPartition(topics.QUERIES, p) for p in partitions])
            else:
                self.feed.read(topics.FEEDBACK, dict.fromkeys(partitions))
            log.warning(
                "restored %d %s predictions of partitions %s in %.2f s",
                len(found),
                what,
                sorted(partitions),
                seconds,
            )

    # -- stopping -----------------------------------------------------------------------

    def _drain_and_close(self) -> None:
        """A clean stop: take no more queries, answer those pending (bounded), deliver,
        commit, and leave the group at once so the others take over without waiting for
        the session timeout."""
        consumer, pipeline = self.consumer, self.pipeline
        assert consumer is not None
        try:
            assignment = consumer.assignment()
            consumer.pause([tp for tp in assignment if tp.topic != topics.RESPONSES])
            self.feed.stop_reading()
            deadline = time.monotonic() + DRAIN_S
            while len(pipeline.pending) and time.monotonic() < deadline:
                messages = consume_ready(consumer, 2000, 0.01)
                if messages:
                    self._handle(messages)
                pipeline.tick(now_us())
                self.producer.poll(0)
            left = self.producer.flush(10)
            if left:
                log.error("%d records not delivered at shutdown", left)
            self._maybe_commit(force=True)
        finally:
            consumer.close()
            self.feed.close()
