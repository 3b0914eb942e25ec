"""selection/realised_lift: how much harder the trained batches were than random ones, under the model
that trained them (docs/DESIGN.md §4).

Where ``selection/lift`` scores a plan on the bank it was made from, the realised lift scores each
trained batch and a random global batch with the model as it is before the same step's update, and
reports the ratio of their means for the epoch. A reference batch costs a forward pass of its own, so an
epoch scores steps every ``run.log_every_steps``, or more sparsely where that would score more than
``SCORED_STEPS_PER_EPOCH`` of its plan's steps: the figure's cost stays bounded however long an epoch is.
"""

from collections.abc import Callable

import numpy as np
import torch

from dist_cl.plan.sampler import PlanSampler
from dist_cl.runtime.seeding import Stream, derive_seed

SCORED_STEPS_PER_EPOCH = 32
"""The most steps of an epoch the realised lift scores."""


def scoring_interval(log_every_steps: int, steps_per_epoch: int) -> int:
    """Steps between two scored steps: the logging cadence, widened so that an epoch of ``steps_per_epoch``
    scores at most ``SCORED_STEPS_PER_EPOCH`` of them."""
    return max(log_every_steps, -(-steps_per_epoch // SCORED_STEPS_PER_EPOCH))


class RealisedLift:
    """The reference batches and the epoch's (trained, reference) scoring losses.

    ``score`` is this rank's scoring loss of its slice of a global batch (``TrainStep.score``, a
    collective), ``sampler`` says which slice is this rank's and how long the epoch's plan is; a step is
    scored every ``log_every_steps``, or sparser in a long plan (``scoring_interval``).
    """

    def __init__(self, dataset, sampler: PlanSampler, score: Callable[[torch.Tensor, torch.Tensor], float],
                 seed: int, batch_size: int, log_every_steps: int):
        self.dataset, self.sampler, self.score = dataset, sampler, score
        self.seed, self.batch_size, self.log_every_steps = seed, batch_size, log_every_steps
        self.pairs: list[tuple[float, float]] = []

    def reference_batch(self, epoch: int, step: int) -> np.ndarray:
        """The random global batch of ``step`` (stream REFERENCE): the same on every rank and after a resume."""
        rng = np.random.default_rng(derive_seed(self.seed, Stream.REFERENCE, epoch, step))
        return rng.choice(len(self.dataset), self.batch_size, replace=False)

    @torch.no_grad()
    def reference_loss(self, epoch: int, step: int) -> float | None:
        """At a step that scores the realised lift, this rank's scoring loss of the step's reference batch,
        before the update (a collective); else None."""
        if (step + 1) % scoring_interval(self.log_every_steps, len(self.sampler.plan)):
            return None
        view_a, view_b, _ = self.dataset.batch(self.sampler.local_slice(self.reference_batch(epoch, step)).tolist())
        return self.score(view_a, view_b)

    def add(self, trained: float | None, reference: float | None) -> None:
        """One step's pair: the trained batch's scoring loss (None where skipped or not scored) and its
        reference's."""
        if trained is not None and reference is not None:
            self.pairs.append((trained, reference))

    def take(self) -> float | None:
        """The epoch's realised lift (None where no step was scored), starting the next epoch's."""
        pairs, self.pairs = self.pairs, []
        if not pairs:
            return None
        trained, reference = np.mean(pairs, axis=0)
        return float(trained / reference)
