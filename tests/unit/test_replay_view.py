"""What `clipstream replay` shows while it reads."""

from __future__ import annotations

from rich.progress import Progress

from clipstream.streams.ops.replay_view import RateColumn


def rendered(advances: list[int], total: int) -> str:
    progress = Progress(RateColumn(), auto_refresh=False, disable=True)
    task = progress.add_task("feedback records", total=total)
    for n in advances:
        progress.advance(task, n)
    return RateColumn().render(progress.tasks[0]).plain


def test_a_replay_of_one_message_still_shows_its_rate():
    # one update gives rich no speed of its own (it needs two samples)
    shown = rendered([1], total=1)
    assert shown.endswith(" records/s") and float(shown.split()[0].replace(",", "")) > 0


def test_the_rate_is_shown_over_many_updates_and_not_before_any():
    assert rendered([], total=10) == ""
    assert rendered([1] * 10, total=10).endswith(" records/s")
