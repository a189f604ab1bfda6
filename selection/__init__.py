"""clipstream's model selection layer: Exp3, Exp4 and ensemble combination in pure numpy,
with state that serialises to JSON-compatible dicts (Faust table values).

No Kafka or Faust imports here."""

from selection.ensemble import Combined, combine, loss_for, reward_to_loss
from selection.exp3 import Exp3
from selection.exp4 import Exp4
from selection.state import LEARNING, SelectionState, selection_key

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
