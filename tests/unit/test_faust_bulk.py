"""The one override of Faust's private consumer loop refuses a release it was not written
for, loudly, at start-up, and lets a worker stop with observations not yet acknowledged."""

from __future__ import annotations

import faust
import pytest

from streams import faust_bulk


def test_the_installed_faust_streaming_is_one_the_override_was_written_for() -> None:
    faust_bulk.check_version(faust.__version__)


def test_another_release_is_refused_with_what_to_do() -> None:
    with pytest.raises(faust_bulk.UnsupportedFaust) as refused:
        faust_bulk.check_version("0.16.0")
    assert "0.16.0" in str(refused.value) and "CLIPSTREAM_BULK_LEARN=0" in str(refused.value)


class Unacked:
    acked = False
    refcount = 0


@pytest.mark.timeout(60)  # without the hook Faust's wait swallows the cancellation
def test_stopping_writes_and_acknowledges_what_the_handlers_hold_first() -> None:
    """Faust's consumer waits, when it stops, until every message it handed out is
    acknowledged; the learner acknowledges observations once their states are written,
    on a timer that has already stopped by then. Without the hook this waits for ever
    (a stopped worker hung until it was killed, its observations uncommitted)."""
    app = faust.App("bulk-stop", broker="kafka://127.0.0.1:1", store="memory://")
    held = Unacked()
    written = []

    def flush() -> None:
        written.append(held)
        held.acked = True
        app.consumer._unacked_messages.discard(held)

    faust_bulk.install(app, {}, before_wait_empty=flush)
    consumer = app.consumer
    assert isinstance(consumer, faust_bulk.BulkConsumer)

    async def stop() -> None:
        consumer._unacked_messages.add(held)
        await consumer.wait_empty()

    app.loop.run_until_complete(stop())
    assert written == [held]
