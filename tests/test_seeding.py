"""The seed streams (dist_cl.runtime.seeding): every derived seed is tagged with its stream, and the order in
which the trainer builds its checkpoint components moves none of them."""

import hashlib
import random

import numpy as np
import pytest
import torch
from conftest import ROOT

from dist_cl.runtime.seeding import RankRNG, Stream, derive_seed


def digest(*arrays) -> str:
    hashed = hashlib.sha256()
    for array in arrays:
        hashed.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    return hashed.hexdigest()


def global_rng_states() -> tuple:
    return torch.get_rng_state(), str(np.random.get_state()), random.getstate()


def test_streams_never_share_a_seed_for_the_same_epoch_and_index():
    """Before the tags, the reference batch of (epoch, step k) and the augmentation of (epoch, sample k)
    drew from one seed."""
    seeds = {stream: {derive_seed(0, stream, 2, k) for k in range(200)} for stream in Stream}
    assert all(len(drawn) == 200 for drawn in seeds.values())
    assert len(set().union(*seeds.values())) == 200 * len(Stream)


def test_the_rng_component_captures_state_and_seeds_nothing():
    torch.manual_seed(3)
    before = global_rng_states()
    RankRNG(rank=1, world_size=2, device=torch.device("cpu"))
    after = global_rng_states()
    assert torch.equal(before[0], after[0]) and before[1:] == after[1:]


def run_seeds(trainer) -> dict[str, str]:
    """Digests of what the run draws from its seeds: the first epoch's plan, an augmented sample, a
    reference batch of selection/realised_lift, the initial weights and the per-rank global stream."""
    plan, _ = trainer.planner.plan(0, step=0)
    trainer.train_set.set_epoch(0)
    view_a, view_b, _ = trainer.train_set[7]
    return {"plan": plan.digest(), "augmentation": digest(view_a, view_b),
            "reference batch": digest(trainer.lift.reference_batch(0, 9)),
            "weights": digest(*(t.numpy() for t in trainer.model.state_dict().values())),
            "rank stream": digest(torch.get_rng_state().numpy(), torch.rand(4).numpy())}


@pytest.fixture
def distributed():
    from dist_cl.runtime.distributed import close_distributed, init_distributed

    info = init_distributed(backend="gloo")
    yield info
    close_distributed()


def test_the_order_of_building_checkpoint_components_leaves_every_seed_unchanged(tmp_path, monkeypatch,
                                                                                  distributed):
    from dist_cl.config import load_config
    from dist_cl.trainer import Trainer

    overrides = ["train.epochs=2", "eval.every_epochs=0", "train.global_batch_size=479"]

    def seeds_of(name: str) -> dict[str, str]:
        trainer = Trainer(load_config(ROOT / "configs" / "digits.yaml", [*overrides, f"run.dir={tmp_path / name}"]),
                          distributed)
        try:
            return run_seeds(trainer)
        finally:
            trainer.close()

    in_order = seeds_of("in_order")
    import dist_cl.trainer

    build_model, components = dist_cl.trainer.build_training_model, Trainer.checkpoint_components

    def rng_first(cfg, *args):
        """The RNG component built before the model, as a reordered trainer might build it."""
        info = distributed
        rng_first.component = RankRNG(info.rank, info.world_size, info.device)
        return build_model(cfg, *args)

    def reversed_components(self):
        built = {name: component for name, component in reversed(components(self).items()) if name != "rng"}
        return {"rng": rng_first.component, **built}

    monkeypatch.setattr(dist_cl.trainer, "build_training_model", rng_first)
    monkeypatch.setattr(Trainer, "checkpoint_components", reversed_components)
    assert seeds_of("reordered") == in_order
