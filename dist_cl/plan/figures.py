"""The figures that describe how a plan was made and how hard it is (docs/DESIGN.md §4)."""

import dataclasses
from dataclasses import dataclass


@dataclass
class SelectionFigures:
    """How an epoch's plan was made and what it is like; TensorBoard ``selection/<field>`` (docs/DESIGN.md §4).

    A field is None where it does not apply (e.g. no lift for a plan that ignores the bank).
    """

    seconds: float | None = None
    """Selection time: preparing the bank snapshot plus computing the plan (and any re-selection)."""
    prepare_seconds: float | None = None
    """Of which the training loop spent completing and copying the bank."""
    wait_seconds: float | None = None
    """Time training waited for the plan (less than ``seconds`` when computed ahead)."""
    share: float | None = None
    """wait_seconds / (wait_seconds + the epoch's training seconds)."""
    lift: float | None = None
    """Plan loss over a random partition's, on the bank the plan was made from (>1: harder)."""
    bank_staleness: float | None = None
    """Mean age in steps of the bank rows at the plan's first step."""
    realised_lift: float | None = None
    """Loss of the batches trained over random batches', scored by the model of the same steps."""
    pair_repeat: float | None = None
    """Share of batch-mate pairs that were batch-mates in the previous epoch's plan too."""
    label_purity: float | None = None
    """Mean share of a batch in its most common class (diagnostic only; selection never reads labels)."""

    def scalars(self) -> dict[str, float]:
        return {f"selection/{k}": v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_scalars(cls, scalars: dict) -> "SelectionFigures":
        """The inverse of ``scalars`` (a plan computed ahead is checkpointed with them)."""
        return cls(**{k.removeprefix("selection/"): v for k, v in scalars.items()})
