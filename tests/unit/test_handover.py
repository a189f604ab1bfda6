"""Partitions moving between workers, without Kafka: what a worker serves, holds, drops and
restores through eager rebalances (clipstream.streams.worker.handover)."""

from __future__ import annotations

from clipstream.streams.wire import topics
from clipstream.streams.wire.clock import now_us
from clipstream.streams.worker.handover import Handover
from tests.unit.fakes import answer_batches, make_pipeline, query


def test_a_restore_cut_short_by_a_rebalance_is_redone_and_its_partitions_then_serve() -> None:
    pipe, producer = make_pipeline()
    handover = Handover(pipe)
    first = handover.assigned({0, 1, 2, 3}, now_us())
    assert first.new == {0, 1, 2, 3} and handover.restoring == {0, 1, 2, 3}
    handover.revoked({0, 1, 2, 3})  # a second worker joins before the restore is done
    second = handover.assigned({0, 1}, now_us())
    assert (second.kept, second.new, second.lost) == (set(), {0, 1}, {2, 3})
    assert not handover.restored(first.epoch, True, {0, 1, 2, 3}, [])  # too late: ignored
    assert handover.restored(second.epoch, True, {0, 1}, [])
    assert handover.serving == {0, 1} and not handover.restoring
    # the answers feedback needs come later; a rebalance before that restores again
    assert not handover.learning
    handover.revoked({0, 1})
    third = handover.assigned({0, 1}, now_us())
    assert third.new == {0, 1} and not third.kept
    assert handover.restored(third.epoch, True, {0, 1}, [])
    assert handover.restored(third.epoch, False, {0, 1}, [])
    assert handover.learning == {0, 1}
    # its queries are answered (they were once held for good: the partitions stayed frozen)
    pipe.on_queries([query("q", partition=0, deadline_ms=60_000)], now_us())
    pipe.tick(now_us())
    answer_batches(pipe, producer)
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["q"]


def test_a_kept_partition_holds_its_predictions_through_the_rebalance_a_moved_one_drops() -> None:
    pipe, producer = make_pipeline()
    handover = Handover(pipe, restore=False)
    handover.assigned({0, 1}, now_us())
    start = now_us()
    pipe.on_queries(
        [query("kept", partition=0, sent=start), query("moved", partition=1, sent=start)], start
    )
    pipe.tick(start)
    handover.revoked({0, 1})
    answer_batches(pipe, producer)  # answers arrive while the rebalance runs: held
    assert not producer.on(topics.PREDICTIONS, "Prediction")
    plan = handover.assigned({0}, now_us())
    assert (plan.kept, plan.lost, plan.dropped) == ({0}, {1}, 1)
    assert [p["query_id"] for p in producer.on(topics.PREDICTIONS, "Prediction")] == ["kept"]
    assert handover.serving == {0}


def test_partitions_lost_without_a_revocation_are_dropped() -> None:
    pipe, _ = make_pipeline()
    handover = Handover(pipe, restore=False)
    handover.assigned({0, 1}, now_us())
    pipe.on_queries([query("q", partition=1, deadline_ms=60_000)], now_us())
    assert handover.lost({1}) == 1
    assert handover.serving == {0} and not pipe.pending
