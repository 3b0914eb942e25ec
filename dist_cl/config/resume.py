"""The resume policy: which config keys may change between a checkpoint and the run resuming it, and what a
resumed run warns about when it differs from the run that wrote the checkpoint.

Pure functions of the checkpoint's ``meta`` and the current run, so the trainer only logs what they return.
"""

from dist_cl.config.schedule import lr_factor
from dist_cl.config.schema import Config, TrainConfig, flatten

RESUMABLE_CHANGES = ("train.epochs", "train.max_skipped_fraction", "eval.", "checkpoint.", "run.", "dist.",
                     "data.num_workers")
"""Config keys that may differ between a checkpoint and the run resuming it."""


def config_differences(saved: dict, current: dict) -> list[str]:
    """Keys whose change makes a checkpoint unusable, with both values. A key the checkpoint's config lacks was
    added since; it counts as its default, which keeps the behaviour of the version that wrote it."""
    a, b = {**flatten(Config().to_dict()), **flatten(saved)}, flatten(current)
    return [
        f"{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key) and not key.startswith(RESUMABLE_CHANGES)
    ]


def resume_warnings(meta: dict, cfg: Config, world_size: int, threads: int, epochs_done: float) -> list[str]:
    """What resuming the checkpoint whose ``meta`` is given changes, on ``world_size`` ranks with ``threads`` CPU
    threads, ``epochs_done`` (fractional) epochs into the run: each change trains on, but not as the
    uninterrupted run would have."""
    warnings = []
    change = epochs_change_warning(meta["config"]["train"]["epochs"], cfg.train, epochs_done)
    if change:
        warnings.append(change)
    if meta["world_size"] != world_size:
        warnings.append(f"resuming on {world_size} ranks from {meta['world_size']}: per-rank RNG streams restart "
                        "(plans and bank are kept)")
    saved_threads = meta.get("threads", threads)
    if saved_threads != threads:  # CPU reductions split their sums by thread
        warnings.append(f"CPU ops use {threads} threads where the checkpoint's run used {saved_threads}: training "
                        "goes on correctly but no longer bit-identical to an uninterrupted run; set "
                        f"OMP_NUM_THREADS={saved_threads} to keep it so")
    return warnings


def epochs_change_warning(saved_epochs: int, train: TrainConfig, progress: float) -> str | None:
    """The learning-rate jump that resuming at ``progress`` (epochs) with another ``train.epochs`` makes:
    the schedule is a function of progress over the total, so a new total moves the whole cosine."""
    if saved_epochs == train.epochs:
        return None
    before, after = (train.lr * lr_factor(progress, train.warmup_epochs, total) for total in (saved_epochs,
                                                                                              train.epochs))
    return (f"train.epochs changed from {saved_epochs} to {train.epochs} on resume: the learning rate at epoch "
            f"{progress:.2f} goes from {before:.3g} to {after:.3g} (the cosine schedule is over train.epochs)")
