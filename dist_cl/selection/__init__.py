"""Batch selection strategies behind one function: plan = select_batches(name, u, v, batch_size, ...).

A plan is an int64 array (n_batches, batch_size) of sample indices; row b is global batch b.
Partitions (random, fixed, sc) use every index at most once; full, ncb and exact osgd are the paper's
small-N strategies over the N-choose-B batch set. A new strategy is declared in dist_cl.config.strategies.STRATEGIES
and bound to its function in STRATEGY_FUNCTIONS.
"""

from collections.abc import Callable
from math import comb

import numpy as np

from dist_cl.config.strategies import STRATEGIES, check_hardness_controls, check_window
from dist_cl.selection.errors import SelectionError
from dist_cl.selection.n_choose_b import full_batch, ncb_batches, osgd, osgd_batches
from dist_cl.selection.partitions import random_partition
from dist_cl.selection.sc_global import sc_global_partition
from dist_cl.selection.scoring import batch_losses, lift, plan_loss
from dist_cl.selection.spectral import spectral_clustering
from dist_cl.selection.window import conflict_graph, honour_window, nearest_partners

STRATEGY_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "random": random_partition,
    "fixed": random_partition,
    "full": full_batch,
    "ncb": ncb_batches,
    "osgd": osgd,
    "sc": spectral_clustering,
    "sc_global": sc_global_partition,
}
"""The function of each strategy declared in dist_cl.config.strategies.STRATEGIES."""

__all__ = ["STRATEGIES", "STRATEGY_FUNCTIONS", "SelectionError", "batch_losses", "batches_per_selection", "lift",
           "plan_loss", "select_batches"]


def batches_per_selection(name: str, n: int, batch_size: int, options: dict) -> int:
    """Rows of one ``select_batches(name, ...)`` plan for N = ``n``: N // B for a partition, osgd's kept
    batches (q, or q per chunk of k), 1 for full, N-choose-B for ncb."""
    if name == "osgd":
        return osgd_batches(n, batch_size, **options)
    if name == "full":
        return 1
    if name == "ncb":
        return comb(n, batch_size)
    return n // batch_size


ORDER_STREAM = 1
"""Seed stream (``[seed, ORDER_STREAM]``) of the order of a loss-aware partition's rows."""
GROUP_STREAM = 2
"""Seed stream of which hard groups ``group_size`` puts together into a batch."""


def select_batches(name: str, u, v, batch_size: int, *, seed: int, tau: float = 0.1, random_fraction: float = 0.0,
                   group_size: int = 0, false_negative_window: int = 0, map_fn: Callable | None = None, device=None,
                   num_samples: int | None = None, loss: str = "infonce", loss_options: dict | None = None,
                   **options) -> np.ndarray:
    """Run strategy ``name`` on the L2-normalised pair embeddings ``u, v`` (N, d); returns the plan.

    A strategy that ignores the embeddings (dist_cl.config.strategies: ``reads_embeddings`` False) may be given
    ``u = v = None`` and ``num_samples`` N instead: it plans for N samples without a bank.

    Two hardness controls for partition strategies (docs/DESIGN.md §5), each exact at its ends:

    - ``random_fraction``: that share of every batch is drawn at random and the strategy fills the rest,
      trading hardness for diversity (hard batches on few classes are full of same-class false negatives;
      docs/RESULTS.md). 0 is the strategy's own plan, 1 a random partition.
    - ``group_size`` g (a divisor of B): the strategy partitions the data into hard groups of g, and each
      batch is B / g of those groups drawn at random, afresh every epoch. Every sample keeps its g - 1
      hardest negatives while the rest of its batch, and so which neighbourhoods meet, changes each epoch.
      g = B is the strategy's own plan, g = 1 a random partition; 0 is off.

    ``false_negative_window`` p (sc, sc_global; dist_cl.selection.window): each sample's p nearest are kept
    out of its candidate edges, and out of its batch wherever another batch has room. 0 is the strategy's
    own plan.

    A loss-aware partition's rows come in a seeded random order: strategies list batches cluster by
    cluster, and consecutive steps on one cluster would make the optimizer's momentum cluster-specific.
    ``map_fn(fn, items)``: how a strategy that splits into independent pieces (sc_global's cells) maps
    them, e.g. over ranks with dist_cl.runtime.distributed.distributed_map; the plan does not depend on it.
    ``device``: the torch device a strategy that computes on one (sc_global) uses; None: the current one.
    ``loss``: the training loss (``loss.name``), with which a strategy that scores batches (osgd) scores them;
    ``loss_options``: its settings beyond tau (``dist_cl.learn.losses.batch_options``).
    """
    if name not in STRATEGIES:
        raise SelectionError(f"unknown selection strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}")
    u, v, n = _checked_pairs(name, u, v, num_samples)
    if batch_size < 2:
        raise SelectionError(f"batch_size={batch_size} must be at least 2 (a batch needs a negative)")
    if batch_size > n:
        raise SelectionError(f"batch_size={batch_size} is larger than the number of pairs N={n}")
    if not tau > 0:
        raise SelectionError(f"tau={tau} must be positive (logits are <u_i, v_j> / tau)")
    if map_fn is not None and STRATEGIES[name].takes_map_fn:
        options["map_fn"] = map_fn
    if device is not None and STRATEGIES[name].takes_device:
        options["device"] = device
    if STRATEGIES[name].takes_loss:
        options["loss"], options["loss_options"] = loss, loss_options
    if not 0.0 <= random_fraction <= 1.0:
        raise SelectionError(f"random_fraction={random_fraction} must be in [0, 1]")
    check_hardness_controls(name, random_fraction, group_size, loss_aware=False, error=SelectionError)
    check_window(name, false_negative_window, random_fraction, group_size, error=SelectionError)
    if false_negative_window < 0:
        raise SelectionError(f"false_negative_window={false_negative_window} must be >= 0 (0: off)")
    # the window's search and swaps run once (on one rank, where map_fn deals work over ranks) and are shared,
    # so that BLAS differences between nodes cannot give the ranks different plans
    once = (lambda fn: map_fn(lambda _: fn(), [None])[0]) if map_fn is not None else (lambda fn: fn())
    if false_negative_window:
        options["conflicts"] = once(lambda: conflict_graph(nearest_partners(u, v, false_negative_window, device)))
    n_random = round(random_fraction * batch_size)
    if group_size:
        if group_size < 0 or batch_size % group_size:
            raise SelectionError(f"group_size={group_size} must divide batch_size={batch_size}")
        plan = _hard_groups(name, u, v, n, batch_size, group_size, seed=seed, tau=tau, **options)
    elif n_random == 0:
        plan = _own_plan(name, u, v, n, batch_size, seed=seed, tau=tau, **options)
    else:
        plan = _mix_random(name, u, v, n, batch_size, n_random, seed=seed, tau=tau, **options)
    if false_negative_window:
        plan = once(lambda: honour_window(plan, options["conflicts"], u + v))
    if STRATEGIES[name].reads_embeddings and STRATEGIES[name].partition:
        plan = plan[np.random.default_rng([seed, ORDER_STREAM]).permutation(len(plan))]
    return np.ascontiguousarray(plan, dtype=np.int64)


def _checked_pairs(name: str, u, v, num_samples: int | None) -> tuple[np.ndarray | None, np.ndarray | None, int]:
    """``u, v`` as arrays and their N; or, for a strategy that ignores them, ``(None, None, num_samples)``."""
    if u is None and v is None:
        if STRATEGIES[name].reads_embeddings:
            raise SelectionError(f"strategy {name!r} reads the embeddings: pass u and v, not num_samples alone")
        if num_samples is None:
            raise SelectionError(f"strategy {name!r} needs num_samples (N) where u and v are not given")
        return None, None, num_samples
    if num_samples is not None:
        raise SelectionError("num_samples is for calls without u and v (it is their N); pass one or the other")
    u = np.asarray(u)
    v = np.asarray(v)
    if u.ndim != 2 or u.shape != v.shape:
        raise SelectionError(f"u and v must both be (N, d) arrays of one shape, got {u.shape} and {v.shape}")
    if STRATEGIES[name].reads_embeddings and not (np.isfinite(u).all() and np.isfinite(v).all()):
        raise SelectionError("u or v holds non-finite values (NaN/inf); check the model's embeddings")
    return u, v, u.shape[0]


def _own_plan(name: str, u, v, n: int, batch_size: int, *, seed: int, tau: float, **options) -> np.ndarray:
    """Strategy ``name``'s function, called in its convention (dist_cl.config.strategies.Strategy.reads_embeddings):
    on ``u, v`` and ``tau`` where it reads the embeddings, on their number ``n`` where it does not."""
    if STRATEGIES[name].reads_embeddings:
        return STRATEGY_FUNCTIONS[name](u, v, batch_size, seed=seed, tau=tau, **options)
    return STRATEGY_FUNCTIONS[name](n, batch_size, seed=seed, **options)


def _hard_groups(name: str, u, v, n: int, batch_size: int, group_size: int, *, seed: int, tau: float,
                 **options) -> np.ndarray:
    """Batches of ``batch_size // group_size`` hard groups, the groups put together at random."""
    if group_size == 1:  # groups of one sample: nothing is hard, the plan is a random partition
        return random_partition(n, batch_size, seed=seed)
    groups = _own_plan(name, u, v, n, group_size, seed=seed, tau=tau, **options)
    n_groups = n // batch_size * (batch_size // group_size)
    chosen = np.random.default_rng([seed, GROUP_STREAM]).permutation(len(groups))[:n_groups]
    return groups[chosen].reshape(-1, batch_size)


def _mix_random(name: str, u, v, n: int, batch_size: int, n_random: int, *, seed: int, tau: float,
                **options) -> np.ndarray:
    """Batches of ``batch_size - n_random`` chosen by the strategy, each completed by ``n_random`` random samples."""
    n_batches = n // batch_size
    usable = np.random.default_rng(seed).permutation(n)[: n_batches * batch_size]
    reserved, chosen = usable[: n_batches * n_random], np.sort(usable[n_batches * n_random :])
    n_chosen = batch_size - n_random
    if n_chosen < 2:  # a strategy needs pairs to compare: the whole batch is random
        return usable.reshape(n_batches, batch_size)
    rows = (u[chosen], v[chosen]) if STRATEGIES[name].reads_embeddings else (None, None)
    hard = chosen[_own_plan(name, *rows, len(chosen), n_chosen, seed=seed, tau=tau, **options)]
    return np.concatenate([hard, reserved.reshape(n_batches, n_random)], axis=1)
