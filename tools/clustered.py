"""Clustered synthetic pair embeddings: the input on which the selection benchmarks
(tools/bench_selection.py, tools/bench_selection_ranks.py) and tools/gpu_check.py time and score batch selection."""

import numpy as np


def clustered_pairs(n: int, d: int, *, seed: int, mean_cluster_size: int = 64, cluster_spread: float = 1.0,
                    view_noise: float = 0.5, noise_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic pair embeddings with many tight clusters on the sphere plus uniform noise.

    n // mean_cluster_size centres uniform on S^{d-1}; cluster sizes are drawn with log-normal weights
    (sigma 1, so sizes vary ~10x, like class frequencies). A pair's location z = normalise(c +
    cluster_spread * g / sqrt(d)), g standard normal (cos(z_i, z_j) ~ 1 / (1 + spread^2) = 0.5 within a
    cluster); a noise_fraction of pairs instead have z uniform on the sphere. The two views are
    u, v = normalise(z + view_noise * g / sqrt(d)) (cos(u_i, v_i) ~ 0.8). Returns float32 (n, d) arrays.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(1, n // mean_cluster_size)
    centres = unit_rows(rng.standard_normal((n_clusters, d)))
    weights = np.exp(rng.standard_normal(n_clusters))
    cluster = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    z = centres[cluster] + cluster_spread / np.sqrt(d) * rng.standard_normal((n, d))
    noise = rng.random(n) < noise_fraction
    z[noise] = rng.standard_normal((int(noise.sum()), d))
    z = unit_rows(z)
    u = unit_rows(z + view_noise / np.sqrt(d) * rng.standard_normal((n, d)))
    v = unit_rows(z + view_noise / np.sqrt(d) * rng.standard_normal((n, d)))
    return u.astype(np.float32), v.astype(np.float32)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)
