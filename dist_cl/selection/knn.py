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


def cross_knn(u: np.ndarray, v: np.ndarray, k: int,
              device: torch.device | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Neighbour indices (n, k): the k largest <u_i, v_j> over j != i, and the k largest <v_i, u_j>.

    One product U V^T serves both directions (its rows and its columns); k is clipped to n - 1.
    Runs on ``device`` (see ``resolve_device``).
    """
    n = len(u)
    k = min(k, n - 1)
    u, v = (torch.as_tensor(x, dtype=torch.float32, device=resolve_device(device)) for x in (u, v))
    s = u @ v.T
    s.fill_diagonal_(float("-inf"))  # the positive pair is not a candidate negative
    u_to_v = s.topk(k, dim=1).indices
    v_to_u = s.T.contiguous().topk(k, dim=1).indices
    return u_to_v.cpu().numpy(), v_to_u.cpu().numpy()
