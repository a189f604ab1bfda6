"""What ``clipstream replay`` shows: its progress rate and the weights it would install next
to the live ones."""

from __future__ import annotations

from rich.progress import ProgressColumn, Task
from rich.table import Table
from rich.text import Text

from clipstream.selection import SelectionState


class RateColumn(ProgressColumn):
    """Records per second (rich's own speed column counts bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.completed and task.elapsed:
            # rich's speed needs two updates; a replay whose observations came in one
            # message (a learning batch of a second holds a few hundred) has one
            speed = task.completed / task.elapsed
        return Text("" if speed is None else f"{speed:,.0f} records/s")


def weights_table(live: dict[str, SelectionState], replayed: dict[str, SelectionState]) -> Table:
    """One row per selection key and model: the live weight and the replayed one (Exp4's
    weights, Exp3's probabilities)."""
    table = Table("selection key", "model", "live", "replayed", title="selection weights")
    for key in sorted(set(live) | set(replayed)):
        now = live[key].weights() if key in live else {}
        then = replayed[key].weights() if key in replayed else {}
        for model in sorted(set(now) | set(then)):
            table.add_row(key, model, _weight(now.get(model)), _weight(then.get(model)))
    return table


def _weight(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
