"""The paper's synthetic setting: N positive pairs whose embeddings are free parameters of the model.

A sample is just its index; the free-embedding model (dist_cl.learn.models.FreeEmbeddings) looks it up.
"""

import torch

from dist_cl.data.pairs import PairDataset


class SyntheticPairs(PairDataset):
    def __init__(self, num_samples: int, seed: int):
        super().__init__(seed)
        self.num_samples = num_samples

    def __len__(self) -> int:
        return self.num_samples

    def load(self, index: int) -> torch.Tensor:
        return torch.tensor(index)

    def augment(self, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def clean(self, sample: torch.Tensor) -> torch.Tensor:
        return sample

    def __getitem__(self, index: int):
        # nothing random to seed, and seeding the per-sample RNGs was most of an epoch (docs/BENCHMARKS.md)
        sample = self.load(index)
        return sample, sample, index

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A whole batch in one call, as the DataLoader asks where this exists: a sample is its index, so a
        call and a collation per sample were most of what the loader cost a step (docs/BENCHMARKS.md)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return index, index, index

    @staticmethod
    def collate(batch):
        return batch

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.__getitems__(indices)
