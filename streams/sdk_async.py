"""The client SDK for asyncio apps: AsyncClient and AsyncPredictor over the sync SDK.

``AsyncPredictor`` is the sync ``Predictor`` with asyncio futures: the same one background
thread reads clipstream.predictions and resolves each awaited query's future on its event
loop (``loop.call_soon_threadsafe``), so any number of concurrent ``await predict(...)``
share one consumer. The semantics are the sync SDK's: each query id answered once, the
worker's default output when no model answers by the deadline, ``TimeoutError`` (and the
query forgotten) when no answer comes at all within ``timeout``. Producing does not block
the event loop (librdkafka queues and sends from its own threads) unless its local queue
is full; only the constructors and ``flush``/``close`` wait on the broker, ``flush`` and
``close`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from functools import partial
from typing import Any

from clipstream.streams.sdk import Client, Predictor
from clipstream.streams.wire.config import Settings


class AsyncClient:
    """Produces queries and feedback from asyncio code (``Client``'s arguments)."""

    def __init__(self, settings: Settings | None = None, **producer_config: Any) -> None:
        self.sync = Client(settings, **producer_config)

    @classmethod
    def over(cls, client: Client) -> AsyncClient:
        """An AsyncClient producing with an existing ``Client``."""
        self = cls.__new__(cls)
        self.sync = client
        return self

    @property
    def settings(self) -> Settings:
        return self.sync.settings

    async def send_query(self, app: str, features: Sequence[float] = (), **kw: Any) -> str:
        """Produce one query; returns its id (``Client.send_query``'s arguments)."""
        return self.sync.send_query(app, features, **kw)

    async def send_feedback(self, query_id: str, app: str, **kw: Any) -> None:
        """Produce feedback for a query (``Client.send_feedback``'s arguments)."""
        self.sync.send_feedback(query_id, app, **kw)

    async def flush(self, timeout: float = 30.0) -> None:
        """Wait until everything produced is delivered; TimeoutError if not in ``timeout``."""
        await asyncio.to_thread(self.sync.flush, timeout)


class AsyncPredictor:
    """Request/response over Kafka for asyncio: ``await predict()`` sends a query and waits
    for its answer. Use it from one event loop or several; construct it once (it connects
    and resolves the predictions' end offsets before returning)."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.sync = Predictor(settings)
        self.settings = self.sync.settings
        self.client = AsyncClient.over(self.sync.client)
        self.reader = self.sync.reader

    @property
    def waiting(self) -> int:
        """Queries sent whose prediction has neither come nor been given up on."""
        return self.sync.waiting

    async def predict(
        self, app: str, features: Sequence[float], timeout: float | None = 10.0, **kw: Any
    ) -> dict[str, Any]:
        """Send a query and return its prediction (``Predictor.predict``'s semantics and
        arguments). A cancelled or timed-out call forgets its query."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        qid = kw.pop("query_id", None) or uuid.uuid4().hex
        self.sync._send(app, features, qid, partial(_hand_over, loop, future), kw)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            if self.sync._forget(qid):
                raise
            return await asyncio.wait_for(future, 5)  # it came just as the time ran out
        except BaseException:  # cancelled: nobody awaits its prediction any more
            self.sync._forget(qid)
            raise

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncPredictor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _hand_over(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], record: dict[str, Any]
) -> None:
    """In the reader thread: resolve ``future`` on its own loop."""
    loop.call_soon_threadsafe(_resolve, future, record)


def _resolve(future: asyncio.Future[Any], record: dict[str, Any]) -> None:
    if not future.done():
        future.set_result(record)
