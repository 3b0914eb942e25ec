"""Exact cross k-nearest neighbours between the two sides of the pairs: the candidate edges of SC-global.

Only pairs with a large s_ij or s_ji carry loss affinity (docs/DESIGN.md §1), so each u_i is linked to its k
nearest v's and each v_i to its k nearest u's. SC-global calls this inside cells of a few thousand
samples, where one dense block U V^T is cheap and exact; approximate search over the whole data set was
both slow and of poor recall (docs/BENCHMARKS.md, "sc_global design").
"""

import numpy as np
import torch


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device``, or where none is given the calling thread's current CUDA device, else the CPU; a CUDA
    device without an index is the current one."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


GROUPS = 16
"""Members of a block in the two-stage top-k: a row's k largest lie in its k blocks of largest maximum."""


def cross_knn(u: np.ndarray, v: np.ndarray, k: int,
              device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, u_to_v, v_to_u): the block S = U V^T (float32, on the host; sparse_loss_affinity reads its
    entries) and neighbour indices (n, k): the k largest <u_i, v_j> over j != i, and the k largest <v_i, u_j>.

    One product serves both directions (its rows and its columns); k is clipped to n - 1.
    Runs on ``device`` (see ``resolve_device``).
    """
    n = len(u)
    k = min(k, n - 1)
    device = resolve_device(device)
    padded = -(-n // GROUPS) * GROUPS
    u, v = (torch.nn.functional.pad(torch.as_tensor(x, dtype=torch.float32, device=device), (0, 0, 0, padded - n))
            for x in (u, v))
    s = u @ v.T
    positives = s.diagonal().clone()
    s.fill_diagonal_(float("-inf"))  # the positive pair is not a candidate negative, nor is padding
    s[n:], s[:, n:] = float("-inf"), float("-inf")
    if padded // GROUPS < 4 * k:  # too few blocks to gain from the first stage
        u_to_v, v_to_u = s.topk(k, dim=1).indices, s.T.contiguous().topk(k, dim=1).indices
    else:
        u_to_v, v_to_u = _top_k(s, k, dim=1), _top_k(s, k, dim=0)
    s.diagonal().copy_(positives)
    return s[:n, :n].cpu().numpy(), u_to_v[:n].cpu().numpy(), v_to_u[:n].cpu().numpy()


def _top_k(s: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """For each line of ``s`` across ``dim`` (its rows for dim 1, its columns for dim 0), the indices along
    ``dim`` of its k largest entries; ``s.shape[dim]`` a multiple of GROUPS.

    Exact (up to ties), without a full top-k of every line or a transposed copy of ``s``: index j is in
    block j mod (s.shape[dim] / GROUPS), and a line's k largest entries lie in its k blocks of largest maximum
    (each of them lifts its block's maximum to at least the k-th largest), so the top-k runs over k GROUPS
    candidates. Strided blocks keep the maxima's reduction along contiguous memory in both directions.
    """
    blocks = s.shape[dim] // GROUPS
    maxima = s.unflatten(dim, (GROUPS, blocks)).amax(dim)
    lines = s if dim == 1 else s.T
    best = (maxima if dim == 1 else maxima.T).topk(k, dim=1).indices
    offsets = blocks * torch.arange(GROUPS, device=s.device)[:, None]
    candidates = (best[:, None, :] + offsets).flatten(1)
    return candidates.gather(1, lines.gather(1, candidates).topk(k, dim=1).indices)
