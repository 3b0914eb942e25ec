"""Sharded forward passes: each rank embeds a share of the indices, and all ranks get every row in order.

Exactly one row per requested index whatever the world size: the share of the last ranks is padded by
repeating an index, and the padding is dropped after the gather.
"""

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dist_cl.data import loader_options
from dist_cl.runtime.distributed import DistInfo, gather_rows


class _EmbeddingInputs(Dataset):
    """Model inputs for each requested index: its two augmented views, or its two clean ones."""

    def __init__(self, dataset, indices: np.ndarray, augmented: bool):
        self.dataset = dataset
        self.indices = indices
        self.augmented = augmented

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        if self.augmented:
            view_a, view_b, _ = self.dataset[index]
            return view_a, view_b
        return self.dataset.clean_pair(index)


@torch.no_grad()
def embed_indices(
    model, dataset, indices: np.ndarray, *, rank: int, world_size: int, device: torch.device,
    batch_size: int = 256, augmented: bool = False, output: str = "projection", num_workers: int = 0,
    side_b: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(u, v) rows for ``indices``, in that order, on every rank (CPU float32).

    ``augmented`` embeds the two augmented views of each sample (the pair), else its two clean views
    (``clean_pair``: tower a for u, tower b for v). ``side_b=False`` skips v (returned as None) where only u is needed.
    ``model`` must be unwrapped (no DDP) and is run in eval mode.
    """
    indices = np.asarray(indices, dtype=np.int64)
    n = len(indices)
    per_rank = -(-n // world_size)
    padded = np.concatenate([indices, np.repeat(indices[-1:], per_rank * world_size - n)])
    mine = padded[rank * per_rank : (rank + 1) * per_rank]
    was_training = model.training
    model.eval()
    loader = DataLoader(_EmbeddingInputs(dataset, mine, augmented), batch_size=batch_size,
                        **loader_options(num_workers, device))
    us, vs = [], []
    for x_a, x_b in loader:
        us.append(model.embed(x_a.to(device, non_blocking=True), side="a", output=output).float())
        if side_b:
            vs.append(model.embed(x_b.to(device, non_blocking=True), side="b", output=output).float())
    model.train(was_training)
    u = gather_rows(torch.cat(us))[:n].cpu()
    return u, gather_rows(torch.cat(vs))[:n].cpu() if side_b else None


def embed_split(
    model, dataset, info: DistInfo, *, output: str, views: str, epoch: int, batch_size: int,
    chunk_size: int, num_workers: int, progress: bool,
) -> dict[str, np.ndarray]:
    """Arrays by file stem ('u', 'v', 'backbone'), one row per sample of ``dataset`` in index order.

    ``output`` is 'projection', 'backbone' or 'both'; ``views`` 'augmented', 'clean' or 'auto' (projections
    of augmented pairs, backbone features of clean inputs, as the trainer's evaluation). The split is
    embedded chunk by chunk (each chunk sharded over the ranks) so that rank 0 can show progress.
    """
    n = len(dataset)
    dataset.set_epoch(epoch)
    wanted = []  # (stems, embed_indices output, augmented)
    if output in ("projection", "both"):
        wanted.append((("u", "v"), "projection", views != "clean"))
    if output in ("backbone", "both"):
        wanted.append((("backbone", None), "backbone", views == "augmented"))
    parts: dict[str, list[torch.Tensor]] = {}
    bar = tqdm(total=n * len(wanted), desc="embedding", unit="rows", disable=not progress, dynamic_ncols=True)
    for stems, kind, augmented in wanted:
        for start in range(0, n, chunk_size):
            indices = np.arange(start, min(start + chunk_size, n))
            a, b = embed_indices(
                model, dataset, indices, rank=info.rank, world_size=info.world_size, device=info.device,
                batch_size=batch_size, augmented=augmented, output=kind, num_workers=num_workers,
                side_b=stems[1] is not None,
            )
            for stem, rows in zip(stems, (a, b)):
                if stem is not None:
                    parts.setdefault(stem, []).append(rows)
            bar.update(len(indices))
    bar.close()
    return {stem: torch.cat(chunks).numpy() for stem, chunks in parts.items()}
