"""train.compile: the compiled model trains as the eager one does; a setup dynamo cannot take is refused by name."""

import pytest
import torch
from accumulation_steps import BATCHES, Encoder, N, views
from conftest import ROOT

from dist_cl.config import Config, ConfigError, load_config
from dist_cl.learn.step import TrainStep


@pytest.fixture(scope="module")
def one_process(one_torch_thread):
    from dist_cl.runtime.distributed import close_distributed, init_distributed

    init_distributed(backend="gloo")
    yield
    close_distributed()


def losses(compile_model: bool) -> list[float]:
    """The losses of 3 float32 steps of a LayerNorm encoder under DDP (a BatchNorm-free model: a compiled
    graph may order its sums differently, nothing else)."""
    cfg = Config()
    cfg.train.compile, cfg.train.global_batch_size = compile_model, len(BATCHES[0])
    torch.manual_seed(0)
    model = Encoder(learnable_tau=True)
    step_fn = TrainStep(cfg, model, torch.optim.SGD(model.parameters(), lr=0.5), 0, 1, torch.device("cpu"), N)
    assert isinstance(step_fn.ddp, torch._dynamo.eval_frame.OptimizedModule) == compile_model
    out = []
    for step, batch in enumerate([*BATCHES, BATCHES[0]]):
        index = torch.tensor(batch)
        view_a, view_b = (v.float() for v in views(step, index, free=False))
        out.append(step_fn(view_a, view_b, index, lambda: "a test step").loss)
    return out


def test_a_compiled_model_trains_to_the_eager_losses_within_float_tolerance(one_process):
    eager, compiled = losses(False), losses(True)
    assert compiled == pytest.approx(eager, rel=1e-5)
    assert eager[-1] != pytest.approx(eager[0], rel=1e-3)  # the steps trained: the comparison covers updates


def test_compile_with_free_embeddings_is_refused_by_name():
    config = ROOT / "configs" / "synthetic.yaml"
    assert not load_config(config).train.compile  # off by default
    with pytest.raises(ConfigError, match=r"train.compile=true with model.backbone=free: dynamo cannot trace the "
                                          r"sparse gradient .*set train.compile=false"):
        load_config(config, ["train.compile=true"])
