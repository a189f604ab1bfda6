"""clipstream's model selection layer: Exp3, Exp4 and ensemble combination, with state
that serialises to JSON (the selection table's values). Python only: the bandits' weights
are plain floats (a handful of arms, updated at the feedback rate, where numpy's per-call
overhead cost more than the arithmetic); the ensemble combines numpy score arrays.

No Kafka or Faust imports here."""

from clipstream.selection.ensemble import Combined, combine, loss_for, reward_to_loss
from clipstream.selection.exp3 import Exp3
from clipstream.selection.exp4 import Exp4
from clipstream.selection.state import LEARNING, SelectionState, selection_key

__all__ = [
    "LEARNING",
    "Combined",
    "Exp3",
    "Exp4",
    "SelectionState",
    "combine",
    "loss_for",
    "reward_to_loss",
    "selection_key",
]
