"""Faust's consumer with a bulk path: the one override of Faust's private consumer loop.

Faust hands every message to its streams one at a time, through a task per message
(``wait_first`` in the consumer's drain loop, then the conductor and the stream): about
80 us per message on this project's machines, more than folding an observation into a
selection state costs. For the topics given a bulk handler this consumer hands each
fetched batch over in one call instead (streams.learning folds it and writes each
touched key once).

Everything else stays Faust's: the group membership and co-partitioned assignment, the
tables and their changelogs, and offset commits. A bulk message is tracked as unacked
exactly as a stream would track it and acknowledged (``Message.ack``) by the handler, so
commits (which flush Faust's producer, the table's changelog writes, first), rebalances
and recovery behave as for any Faust stream.

The loop below follows faust-streaming's ``Consumer._drain_messages``; ``install``
refuses a faust-streaming release it was not written against.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

BulkHandler = Callable[[list[Message]], None]

#: faust-streaming releases whose consumer loop this override was written against
SUPPORTED = ("0.15.",)


class UnsupportedFaust(RuntimeError):
    """The installed faust-streaming is not one this override was written for."""


#: A fetch returns when this much is waiting, or after FETCH_WAIT_MS: at low rates aiokafka
#: would otherwise fetch every record on its own, each fetch a round of Python networking
#: code and a hop between Faust's consumer thread and its event loop (measured: about a
#: millisecond of CPU each, more than folding the record), and learning can wait 40 ms.
FETCH_MIN_BYTES = 64 * 1024
FETCH_WAIT_MS = 40


class BulkConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read by AIOKafkaConsumer.start() when it builds its fetcher
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS
        return consumer


class BulkConsumer(faust_aiokafka.Consumer):
    """aiokafka-driven Faust consumer; topics in ``bulk_handlers`` bypass the streams."""

    bulk_handlers: dict[str, BulkHandler] = {}
    #: writes what the handlers were given and acknowledges it; called once the fetcher
    #: has stopped, before Faust waits for every message to be acknowledged (it would wait
    #: for ever: the handlers' owner acknowledges on a timer, and timers stop first)
    before_wait_empty: Callable[[], None] | None = None

    def _new_consumer_thread(self) -> Any:
        return BulkConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def wait_empty(self) -> None:
        if self.before_wait_empty is not None:
            self.before_wait_empty()
        await super().wait_empty()

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - I/O loop
        handlers = self.bulk_handlers
        read_offset = self._read_offset
        acks_enabled_for = self.app.topics.acks_enabled_for
        unacked = self._unacked_messages
        try:
            while not (self.should_stop or fetcher.should_stop):
                bulk: dict[str, list[Message]] = {}
                async for tp, message in self.getmany(timeout=1.0):
                    if not await self._before_message(tp, message, read_offset, acks_enabled_for):
                        continue
                    handler = handlers.get(tp.topic)
                    if handler is None:
                        await self.wait_first(self.callback(message), self.suspend_flow.wait())
                    elif message.generation_id == self.app.consumer_generation_id:
                        # fetched before a rebalance: the partition's next owner reads it
                        message.tracked = True
                        unacked.add(message)
                        bulk.setdefault(tp.topic, []).append(message)
                    read_offset[tp] = message.offset
                if self.suspend_flow.is_set():
                    # a rebalance began: drop the batch, it is re-read from the committed
                    # offsets by whoever owns the partitions next
                    for messages in bulk.values():
                        for message in messages:
                            unacked.discard(message)
                    continue
                for topic, messages in bulk.items():
                    handlers[topic](messages)
                await asyncio.sleep(0)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise

    async def _before_message(
        self, tp: TP, message: Message, read_offset: Any, acks_enabled_for: Any
    ) -> bool:
        """Offset bookkeeping before a message is handled; False to skip a message at or
        below what was already read (a re-fetch)."""
        last = read_offset[tp]
        if last is not None and message.offset < last:
            return False
        # a hole in the offsets (compaction, transaction markers) must count as acked or
        # the committed offset would stop there
        if last is not None and message.offset - last > 1 and acks_enabled_for(message.topic):
            await self._add_gap(tp, last + 1, message.offset)
        if self._commit_every is not None and self._n_acked >= self._commit_every:
            self._n_acked = 0
            await self.commit()
        return True


def check_version(version: str = faust.__version__) -> None:
    if not version.startswith(SUPPORTED):
        raise UnsupportedFaust(
            f"streams.faust_bulk overrides faust-streaming's private consumer loop and was "
            f"written for {', '.join(v + 'x' for v in SUPPORTED)}; this is {version}: check "
            "Consumer._drain_messages and update the override (or set "
            "CLIPSTREAM_BULK_LEARN=0 to use Faust's own streams)"
        )


def install(
    app: Any, handlers: dict[str, BulkHandler], before_wait_empty: Callable[[], None] | None = None
) -> None:
    """Make ``app`` build its consumer as a BulkConsumer with these handlers."""
    check_version()

    class AppBulkConsumer(BulkConsumer):
        bulk_handlers = handlers

    if before_wait_empty is not None:
        # a plain function as a class attribute would be bound as a method
        AppBulkConsumer.before_wait_empty = staticmethod(before_wait_empty)  # type: ignore[assignment]

    # The transport is created lazily; its Consumer attribute decides the consumer class.
    app.transport.Consumer = AppBulkConsumer
