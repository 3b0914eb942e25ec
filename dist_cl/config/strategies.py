"""The batch-selection strategies as plain data: each one's name, the options it accepts and how it is called.

A module of its own, importing nothing, so that the config can validate ``selection.options`` and the trainer
can decide what a plan needs (the bank or not, one plan a run or an epoch) without loading the method layer
(dist_cl.selection: torch, scipy, FAISS) or reading function signatures. dist_cl.selection binds each name
to its function; tests/test_selection.py checks every declaration against that function's parameters.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    reads_embeddings: bool
    """True: called ``fn(u, v, batch_size, *, seed, tau, **options)``. False: ``fn(n, batch_size, *, seed,
    **options)``: the plan depends on N and the seed alone (no bank needed)."""
    options: tuple[str, ...] = ()
    """The keyword options it accepts (``selection.options``) besides that calling convention."""
    per_epoch: bool = True
    """False: one plan for the whole run; callers pass the run seed, not an epoch seed."""
    partition: bool = True
    """True: every index at most once (N // B batches), so batches can be mixed with random samples."""
    takes_map_fn: bool = False
    """True: it deals independent pieces of its work over the ranks itself, through ``map_fn``."""
    takes_device: bool = False
    """True: it computes on a torch ``device``."""
    takes_conflicts: bool = False
    """True: it keeps ``conflicts`` out of its loss graph, so the false-negative window applies to it
    (``selection.options.false_negative_window``, dist_cl.selection.window)."""
    takes_loss: bool = False
    """True: it scores batches with the training loss, named by ``loss`` (``loss.name``), whose settings beyond tau
    are ``loss_options``."""


STRATEGIES = {
    "random": Strategy(reads_embeddings=False),
    "fixed": Strategy(reads_embeddings=False, per_epoch=False),
    "full": Strategy(reads_embeddings=False, options=("max_n",), partition=False),
    "ncb": Strategy(reads_embeddings=False, options=("max_batches",), partition=False),
    "osgd": Strategy(reads_embeddings=True, options=("q", "k", "max_batches"), partition=False, takes_loss=True),
    "sc": Strategy(reads_embeddings=True, options=("chunk_batches",), takes_conflicts=True),
    "sc_global": Strategy(reads_embeddings=True, options=("knn", "cell_size", "fine_size", "chunk_batches"),
                          takes_map_fn=True, takes_device=True, takes_conflicts=True),
}

HARDNESS_CONTROLS = ("random_fraction", "group_size")
"""Options select_batches itself applies to any partition strategy (docs/DESIGN.md §5)."""

WINDOW = "false_negative_window"
"""The option select_batches applies to a strategy that ``takes_conflicts``: each sample's p nearest are kept
out of its candidate edges and its batch (dist_cl.selection.window)."""

OPTION_MINIMUMS = {"q": 1, "k": 1, "max_batches": 1, "max_n": 1, "knn": 1, "cell_size": 1, "fine_size": 1,
                   "chunk_batches": 1, "group_size": 0, WINDOW: 0}
"""The least value of each integer option; sc_global's ``chunk_batches`` may also be 0 (one global partition).
``random_fraction`` is the one fractional option, in [0, 1]."""


def check_hardness_controls(strategy: str, random_fraction: float, group_size: int, *, loss_aware: bool,
                            error: type[Exception], prefix: str = "") -> None:
    """The rules the two hardness controls share wherever they are set: a partition strategy to apply to, and
    one control at a time. Raises ``error``, naming the controls with ``prefix`` (``selection.options.``).

    select_batches applies them to any partition (``loss_aware=False``); a run's config asks for a loss-aware
    one (``loss_aware=True``), since on a strategy that reads no embeddings there is no hardness to control.
    """
    controls = [key for key, value in zip(HARDNESS_CONTROLS, (random_fraction, group_size)) if value]
    if not controls:
        return
    declared = STRATEGIES[strategy]
    if not declared.partition or (loss_aware and not declared.reads_embeddings):
        fitting = [name for name, s in STRATEGIES.items() if s.partition and (s.reads_embeddings or not loss_aware)]
        kind = "loss-aware partition" if loss_aware else "partition"
        raise error(f"{prefix}{controls[0]} applies to {kind} strategies; {strategy!r} is not one: use "
                    f"{', '.join(fitting[:-1])} or {fitting[-1]}")
    if len(controls) == 2:
        raise error(f"{prefix}random_fraction and {prefix}group_size are two hardness controls; set one of them")


def accepted_options(strategy: str) -> tuple[str, ...]:
    """The ``selection.options`` keys ``strategy`` takes: its own, the hardness controls, and the window where
    it takes conflicts."""
    declared = STRATEGIES[strategy]
    return declared.options + HARDNESS_CONTROLS + ((WINDOW,) if declared.takes_conflicts else ())


def check_window(strategy: str, window: int, random_fraction: float, group_size: int, *, error: type[Exception],
                 prefix: str = "") -> None:
    """The false-negative window's rules: a strategy that keeps conflicts out of its graph, and no hardness
    control, which would put random samples (and so perhaps a sample's nearest) back into its batches."""
    if not window:
        return
    if not STRATEGIES[strategy].takes_conflicts:
        takers = sorted(name for name, s in STRATEGIES.items() if s.takes_conflicts)
        raise error(f"{prefix}{WINDOW} applies to {' and '.join(takers)}; {strategy!r} builds no loss graph to "
                    "keep a sample's nearest out of")
    if random_fraction or group_size:
        control = "random_fraction" if random_fraction else "group_size"
        raise error(f"{prefix}{WINDOW} keeps each sample's nearest out of its batch, and {prefix}{control} puts "
                    f"random samples into batches, which can bring them back: set one of them")
