"""The contract every data set follows: sample i -> (view_a, view_b, i), reproducible from (seed, epoch, i).

Augmentations draw from the global torch and python RNGs inside ``sample_rng``, seeded from the run
seed, the epoch and the sample index alone (stream AUGMENT of dist_cl.runtime.seeding). A sample's views
are then the same on any rank, in any DataLoader worker and after any resume, which is what makes an
interrupted run end bit-identical.
"""

import hashlib
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from dist_cl.runtime.seeding import Stream, derive_seed


@contextmanager
def sample_rng(seed: int, epoch: int, index: int, *variant: int):
    """Seed torch and python RNGs for one sample (``variant`` tells apart several drawings of one sample, e.g.
    its corrupted versions), restoring the caller's state afterwards."""
    sample_seed = derive_seed(seed, Stream.AUGMENT, epoch, index, *variant)
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator alone: torch.manual_seed also queues a CUDA seeding and formats a stack trace
        torch.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        try:
            yield
        finally:
            random.setstate(py_state)


class PairDataset(Dataset):
    """Map-style two-view data set. Subclasses give ``__len__``, ``load(i)``, ``augment(x)``, ``clean(x)``.

    ``labels`` is an int array (or None); evaluation uses ``clean_item(i)`` (no augmentation). Image data
    sets also give ``raw(i)`` for the corrupted-view evaluation (dist_cl.evaluate.corruptions).
    """

    labels: np.ndarray | None = None

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int):
        raise NotImplementedError

    def augment(self, sample) -> torch.Tensor:
        raise NotImplementedError

    def clean(self, sample) -> torch.Tensor:
        raise NotImplementedError

    def digest(self) -> str:
        """sha256 of which sample each index is: per-sample files made from another data set, subset or split
        (a teacher's embeddings) are told apart from ones made from this one."""
        digest = hashlib.sha256(f"{type(self).__name__}:{len(self)}".encode())
        for part in self.identity():
            digest.update(part)
        return digest.hexdigest()

    def identity(self) -> Iterator[bytes]:
        """What tells these samples from another data set's of the same length: the labels, where known;
        data sets that hold their inputs add them."""
        if self.labels is not None:
            yield np.ascontiguousarray(self.labels, dtype=np.int64).tobytes()

    def raw(self, index: int) -> torch.Tensor:
        """Sample i as a float (C, H, W) image in [0, 1] that ``augment`` takes like a loaded sample: the
        input corruptions are applied to, before augmentation and normalisation."""
        raise NotImplementedError(f"{type(self).__name__} has no images to corrupt")

    def __getitem__(self, index: int):
        sample = self.load(index)
        with sample_rng(self.seed, self.epoch, index):
            view_a = self.augment(sample)
            view_b = self.augment(sample)
        return view_a, view_b, index

    @staticmethod
    def collate(samples):
        """The training loader's ``collate_fn``: joins the samples ``__getitem__`` gave into a batch. A data set
        that fetches a whole batch at once (``__getitems__``) returns it as it is instead."""
        return default_collate(samples)

    def batch(self, indices: list[int]) -> tuple:
        """Samples ``indices`` joined into a batch, as the training loader gives them."""
        return self.collate([self[i] for i in indices])

    def clean_item(self, index: int) -> torch.Tensor:
        return self.clean(self.load(index))

    def clean_pair(self, index: int) -> tuple:
        """Sample i's two views without augmentation: its clean input twice, for tower a and tower b."""
        x = self.clean_item(index)
        return x, x
