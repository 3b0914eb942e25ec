"""A run's checkpoint: what goes in one is composed, and every rank resumes from the same one.

``RunCheckpoints`` saves a ``{name: component}`` map, each component its own state, so a component
registered there cannot be forgotten by resume; rank 0 resolves the checkpoint and every rank agrees on it
(the files themselves: dist_cl.runtime.checkpoint_files). Before training, ``RunCheckpoints.check_room``
writes a probe file there and compares the free space with one checkpoint's estimated size, so that a
directory that cannot hold one fails by name before a step is spent on it.
"""

import logging
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from dist_cl.runtime.checkpoint_files import (
    CheckpointDisagreementError,
    Checkpointer,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_state,
    room_problem,
)

log = logging.getLogger("dist_cl.runtime.checkpoint")


class _ByteCount:
    """A file that counts what is written to it: a checkpoint's size without holding its bytes."""

    def __init__(self):
        self.size = 0

    def write(self, data) -> int:
        self.size += memoryview(data).nbytes
        return memoryview(data).nbytes

    def flush(self) -> None:
        pass


def saved_bytes(state: Any) -> int:
    """The size of the file ``torch.save`` writes for ``state``."""
    count = _ByteCount()
    torch.save(state, count)
    return count.size


def unborn_optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the state ``optimizer`` creates at its first step for the parameters it holds none for yet:
    two tensors of each one's size (AdamW's moments, the most that any train.optimizer keeps)."""
    return sum(2 * p.nelement() * p.element_size() for group in optimizer.param_groups for p in group["params"]
               if p.requires_grad and p not in optimizer.state)


class Stateful(Protocol):
    """A checkpoint component. ``collective = True`` marks one whose ``state_dict`` is a collective."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class RunCheckpoints:
    """A run's checkpoints as a ``{name: component}`` map; the checkpoint is ``{name: state}`` plus ``meta``.

    Saving is a collective: a component marked ``collective`` (the per-rank RNGs) gives its state on every
    rank, the others on rank 0 alone, which writes while the other ranks wait on ``group``.
    """

    def __init__(self, directory: Path, keep: int, components: dict[str, Stateful], is_main: bool, group=None):
        self.checkpointer = Checkpointer(directory, keep)
        self.components = components
        self.is_main = is_main
        self.group = group

    def state(self) -> dict | None:
        """Every component's state on rank 0, None on the others (a collective: see the class)."""
        gathered = {name: c.state_dict() for name, c in self.components.items() if getattr(c, "collective", False)}
        if not self.is_main:
            return None
        return {name: gathered[name] if name in gathered else c.state_dict() for name, c in self.components.items()}

    def save(self, step: int, meta: dict) -> Path | None:
        """Write every component's state and ``meta`` as step ``step``; the path on rank 0, else None."""
        state, path = self.state(), None
        if state is not None:
            path = self.checkpointer.save({**state, "meta": meta}, step)
        dist.barrier(group=self.group)
        return path

    def check_room(self) -> None:
        """Before training (a collective): the checkpoints directory takes a file, and its file system has room
        for one checkpoint: the components' states as saved now, and the optimizer state that the first step
        creates. A directory that cannot hold one would otherwise be found at the first save, after
        checkpoint.every_steps steps or an epoch of training. CheckpointWriteError on every rank where not."""
        state, problem = self.state(), [None]
        if state is not None:
            problem[0] = room_problem(self.checkpointer.directory, saved_bytes(state) + sum(
                unborn_optimizer_bytes(c) for c in self.components.values() if isinstance(c, torch.optim.Optimizer)))
        dist.broadcast_object_list(problem, src=0, group=self.group)
        if problem[0] is not None:
            raise CheckpointWriteError(problem[0])

    def load(self, which: str) -> tuple[dict, Path, list[str]]:
        """(state, path, problems) of ``which`` ('latest' or a path): the newest candidate that holds every
        component, not yet restored."""
        return self.checkpointer.load(which, lambda content: checkpoint_state(content, self.components))

    def progress(self) -> list[str]:
        """What in the run directory says that it trained before: files that only a checkpoint or a finished
        epoch leaves. TensorBoard's event files are not such a sign: a run killed before its first checkpoint
        leaves them, and its restart purges them (``purge_step``)."""
        directory = self.checkpointer.directory
        found = []
        latest = directory / "latest"
        if latest.is_file():
            found.append(f"{latest} (naming {latest.read_text(errors='replace').strip()})")
        sidecars = sorted(p.name for p in directory.glob("step-*.pt.sha256"))
        if sidecars:
            found.append(f"{len(sidecars)} checksum sidecar(s) in {directory} ({sidecars[-1]} the newest)")
        metrics = directory.parent / "metrics.jsonl"
        if metrics.is_file():
            epochs = sum('"kind": "epoch"' in line for line in metrics.read_text(errors="replace").splitlines())
            if epochs:
                found.append(f"{epochs} epoch record(s) in {metrics}")
        return found

    def load_agreed(self, which: str) -> tuple[dict, Path, list[str]] | None:
        """``load(which)`` with every rank on rank 0's choice (a collective); None where ``which`` is
        'none', or 'auto' and rank 0 finds no checkpoint and no sign that the run directory trained before.

        Rank 0 alone resolves ``which`` and broadcasts the identity of what it chose (file, step, sha256);
        every other rank loads that file and checks both. Ranks that resolved 'latest' themselves resumed
        from different steps where their listings differed (node-local run directories, a lagging NFS
        listing) and trained on mismatched state. Any rank that cannot load rank 0's choice makes every
        rank raise CheckpointDisagreementError, naming it, before anything trains.
        """
        chosen: list = [None, None]  # (path, step, sha256) or None; rank 0's error
        if self.is_main:
            try:
                if self.resumes(which):
                    state, path, problems = self.load("latest" if which == "auto" else which)
                    chosen[0] = (str(path), state["counters"]["step"], self.checkpointer.digest(path))
            except (CheckpointError, OSError) as err:  # on every rank, not on rank 0 alone while the others wait
                chosen[1] = str(err)
        dist.broadcast_object_list(chosen, src=0, group=self.group)
        if chosen[1] is not None:
            raise CheckpointError(chosen[1])
        if chosen[0] is None:
            return None
        name, step, digest = chosen[0]
        problem = None
        if not self.is_main:
            try:
                state, path, problems = self.load(name)
                mine = (state["counters"]["step"], self.checkpointer.digest(path))
                if mine != (step, digest):
                    problem = (f"its copy is another checkpoint (step {mine[0]}, sha256 {mine[1][:12]}) than rank "
                               f"0's (step {step}, sha256 {digest[:12]})")
            except (CheckpointError, OSError) as err:
                problem = str(err)
        problems_by_rank: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems_by_rank, problem, group=self.group)
        failed = [(rank, p) for rank, p in enumerate(problems_by_rank) if p is not None]
        if failed:
            raise CheckpointDisagreementError(
                "; ".join(f"rank {rank} cannot load {name}, the checkpoint rank 0 resumes from (step {step}): {p}"
                          for rank, p in failed)
                + "; every rank must see the same run.dir (a file system shared by all nodes), so nothing was trained")
        return state, path, problems

    def resumes(self, which: str) -> bool:
        """Whether ``which`` ('auto', 'none', 'latest' or a path) resumes from a checkpoint rather than training
        from step 0; CheckpointError where starting over would mix two runs' histories in one run directory."""
        directory = self.checkpointer.directory
        if which == "none":
            if self.checkpointer.candidates():
                raise CheckpointError(
                    f"--resume none trains from step 0, but {directory} holds checkpoints, which the new run's "
                    "would be mixed with (and pruned against); choose a new run.dir, or --resume auto to resume")
            return False
        if which != "auto" or self.checkpointer.candidates():
            return True
        progress = self.progress()
        if progress:
            raise CheckpointError(
                f"--resume auto found no checkpoint in {directory} but signs that the run trained before: "
                f"{'; '.join(progress)}; its checkpoints were removed, or are not visible yet (a lagging file "
                "system), and starting over would mix two histories; restore them, or start fresh on purpose: "
                "a new run.dir, or --resume none to train from step 0 in this one")
        return False

    def restore(self, state: dict) -> None:
        """Give every component its state back (``load`` checked that the state holds each)."""
        for name, component in self.components.items():
            component.load_state_dict(state[name])


