"""Image–text pairs: the towers (timm image tower, open_clip's TextTransformer, open_clip's logit scale), the
losses against open_clip's ClipLoss and SigLipLoss (float64, values and gradients, 1 and 2 ranks), and the
config's refusals of what would download or does not fit image–text pairs."""

import math

import open_clip
import pytest
import torch
from clip_losses import BIAS, TAU, make_features
from open_clip.transformer import TextTransformer

from dist_cl.cli.train import main as train_main
from dist_cl.config import ConfigError, load_config
from dist_cl.learn.losses import InfoNCELoss, SigLIPLoss
from dist_cl.learn.models import MAX_LOGIT_SCALE, SIGLIP_INIT_LOGIT_BIAS, LogitScale, build_model

SMALL_TEXT = ["model.text_tower=RN50", "model.text_cfg={width: 32, layers: 1, heads: 4}"]


def features_with_grad():
    u, v = make_features()
    return u.clone().requires_grad_(), v.clone().requires_grad_()


def loss_and_grads(loss_fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, v = features_with_grad()
    loss = loss_fn(u, v)
    loss.backward()
    return loss.detach(), u.grad, v.grad


def test_infonce_is_twice_open_clip_clip_loss_with_gradients():
    ours = loss_and_grads(lambda u, v: InfoNCELoss()(u, v, TAU))
    theirs = loss_and_grads(lambda u, v: open_clip.loss.ClipLoss()(u, v, torch.tensor(1 / TAU, dtype=u.dtype)))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, 2 * b, rtol=0, atol=1e-6)


def test_siglip_equals_open_clip_siglip_loss_with_gradients():
    ours = loss_and_grads(lambda u, v: SigLIPLoss()(u, v, torch.tensor([TAU, BIAS], dtype=u.dtype)))
    theirs = loss_and_grads(lambda u, v: open_clip.loss.SigLipLoss()(
        u, v, torch.tensor(1 / TAU, dtype=u.dtype), torch.tensor(BIAS, dtype=u.dtype)))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_siglip_is_the_pairwise_sigmoid_loss_written_out():
    u, v = make_features()
    logits = u @ v.T / TAU + BIAS
    n = len(u)
    expected = sum(-math.log(1 / (1 + math.exp(-(1 if i == j else -1) * logits[i, j].item())))
                   for i in range(n) for j in range(n)) / n
    assert SigLIPLoss()(u, v, torch.tensor([TAU, BIAS], dtype=u.dtype)).item() == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def two_ranks(collectives):
    return torch.load(collectives / "clip_losses" / "losses.pt")


@pytest.mark.parametrize("ours, theirs, factor", [("dist_infonce", "open_clip_clip", 2.0),
                                                  ("dist_siglip", "open_clip_siglip", 1.0)])
def test_two_ranks_match_open_clip_on_each_rank(two_ranks, ours, theirs, factor):
    for key in ("loss", "grad_u", "grad_v"):
        torch.testing.assert_close(two_ranks[ours][key], factor * two_ranks[theirs][key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, loss_fn", [
    ("dist_infonce", lambda u, v: InfoNCELoss()(u, v, TAU)),
    ("dist_siglip", lambda u, v: SigLIPLoss()(u, v, torch.tensor([TAU, BIAS], dtype=u.dtype))),
])
def test_two_ranks_mean_is_the_single_process_loss_of_the_global_batch(two_ranks, name, loss_fn):
    """The ranks' mean loss is the global batch's; each row's gradient of the summed rank losses is world_size
    times the global loss's (DDP's average then trains the global loss)."""
    loss, grad_u, grad_v = loss_and_grads(loss_fn)
    world_size = len(two_ranks[name]["loss"])
    torch.testing.assert_close(two_ranks[name]["loss"].mean(), loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(two_ranks[name]["grad_u"], world_size * grad_u, rtol=0, atol=1e-12)
    torch.testing.assert_close(two_ranks[name]["grad_v"], world_size * grad_v, rtol=0, atol=1e-12)


def test_text_tower_is_open_clips_text_transformer_with_embed_dim_output():
    model = build_model(load_config(None, [*SMALL_TEXT, "model.embed_dim=16"]), num_samples=4)
    assert isinstance(model.text_tower, TextTransformer)
    images, tokens = torch.randn(3, 1, 16, 16), torch.randint(1, 49407, (3, 77))
    u, v, tau = model(images, tokens)
    assert u.shape == v.shape == (3, 16)
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(3))
    assert model.embed(tokens, side="b").shape == (3, 16)
    with pytest.raises(ValueError, match="context_length 77"):
        model(images, tokens[:, :10])


def test_logit_scale_starts_at_open_clips_init_and_is_read_clamped_at_ln_100():
    scale = LogitScale(0.07, learnable=True)
    assert scale.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert scale().item() == pytest.approx(0.07, rel=1e-6)
    with torch.no_grad():
        scale.logit_scale.fill_(7.0)
    tau = scale()
    assert MAX_LOGIT_SCALE == math.log(100)
    assert tau.item() == pytest.approx(0.01, rel=1e-6)
    tau.backward()
    assert scale.logit_scale.grad.item() == 0.0


def test_siglip_model_learns_a_logit_bias_from_open_clips_init():
    model = build_model(load_config(None, [*SMALL_TEXT, "loss.name=siglip", "loss.learnable_tau=true"]), 4)
    assert model.temperature.logit_scale.item() == pytest.approx(math.log(10), rel=1e-6)
    assert model.logit_bias.item() == SIGLIP_INIT_LOGIT_BIAS == -10.0
    _, _, tau_bias = model(torch.randn(2, 1, 16, 16), torch.randint(1, 49407, (2, 77)))
    tau_bias.sum().backward()
    assert model.logit_bias.grad is not None and model.temperature.logit_scale.grad is not None


def test_text_pretrained_loads_the_text_weights_of_a_local_open_clip_checkpoint(tmp_path):
    source = build_model(load_config(None, SMALL_TEXT), 4)
    path = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": {f"module.{k}": t for k, t in source.text_tower.state_dict().items()}}, path)
    loaded = build_model(load_config(None, [*SMALL_TEXT, f"model.text_pretrained={path}"]), 4)
    for key, value in source.text_tower.state_dict().items():
        torch.testing.assert_close(loaded.text_tower.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("overrides, message", [
    (["model.text_tower=RN5"], r"model.text_tower='RN5' is not an open_clip model config; did you mean RN50"),
    (["model.text_tower=mt5-base-ViT-B-32"], r"Hugging Face text model .*choose an open_clip config"),
    (["model.text_tower=RN50", "model.text_pretrained=openai"],
     r"model.text_pretrained='openai' names weights open_clip downloads.*model.text_pretrained=<its local path>"),
    (["model.text_tower=RN50", "model.text_pretrained=hf-hub:timm/x"], r"open_clip downloads"),
    (["model.backbone_kwargs={pretrained: true}"], r"model.backbone_kwargs.checkpoint_path=<local file>"),
    (["model.text_tower=RN50", "model.text_cfg={widht: 8}"], r"model.text_cfg.widht is not a field of open_clip's "),
    (["model.text_tower=RN50", "model.two_towers=true"], r"the text tower is the second tower"),
    (["model.text_tower=hf-hub:timm/ViT-B-16-SigLIP"], r"open_clip downloads from the hub.*model.text_pretrained="),
    (["model.text_tower=ViT-B-16-SigLIP"], r"vocab_size=32000, but captions are tokenised with open_clip's BPE"),
])
def test_unknown_text_tower_and_downloaded_weights_are_named_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_hub_only_pretrained_name_stops_the_train_command_before_training(tmp_path, capsys):
    code = train_main([f"run.dir={tmp_path}", "model.text_tower=RN50", "model.text_pretrained=laion2b_s34b_b79k"])
    assert code == 2
    assert "model.text_pretrained='laion2b_s34b_b79k'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("loss", ["ntxent", "sogclr", "hcl"])
def test_losses_with_same_modality_negatives_are_refused_with_a_text_tower(loss):
    extra = ["loss.hcl_tau_plus=0.1", "loss.hcl_beta=1.0"] if loss == "hcl" else []
    with pytest.raises(ConfigError, match=f"loss.name={loss} with model.text_tower: its negatives include"):
        load_config(None, [*SMALL_TEXT, f"loss.name={loss}", *extra])


@pytest.mark.parametrize("overrides, message", [
    (["loss.name=siglip"], r"loss.name=siglip are for image–text pairs; set model.text_tower"),
    ([*SMALL_TEXT, "loss.name=siglip", "selection.strategy=osgd"], r"would need SigLIP's learnt logit bias"),
])
def test_siglip_is_refused_without_a_text_tower_or_with_batch_scoring(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.fixture
def process_group(one_torch_thread):
    from dist_cl.runtime.distributed import close_distributed, init_distributed

    init_distributed(backend="gloo")
    yield
    close_distributed()


def siglip_step_grads(accum_steps: int) -> dict[str, torch.Tensor]:
    """The parameters' gradients of one SigLIP TrainStep of an image–text model (float64, eval mode so that
    BatchNorm reads its running statistics and micro-batches change nothing); the step is not refused for the
    -inf of the text tower's causal mask, a buffer outside the checkpoint."""
    from dist_cl.learn.step import TrainStep

    cfg = load_config(None, [*SMALL_TEXT, "loss.name=siglip", "loss.learnable_tau=true", "model.embed_dim=8",
                             "train.global_batch_size=4", f"train.accum_steps={accum_steps}"])
    torch.manual_seed(0)
    model = build_model(cfg, 4).double().eval()
    step = TrainStep(cfg, model, torch.optim.SGD(model.parameters(), lr=0.0), 0, 1, torch.device("cpu"), 4)
    g = torch.Generator().manual_seed(1)
    images, tokens = torch.randn(4, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(1, 49407, (4, 77))
    result = step(images, tokens, torch.arange(4), lambda: "a test step")
    assert not result.skipped
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_siglip_step_trains_scale_and_bias_the_same_with_accumulation(process_group):
    whole, accumulated = siglip_step_grads(1), siglip_step_grads(2)
    assert {"logit_bias", "temperature.logit_scale"} <= whole.keys()
    assert whole.keys() == accumulated.keys()
    for name in whole:
        torch.testing.assert_close(accumulated[name], whole[name], rtol=0, atol=1e-10, msg=name)


def test_the_required_vocabulary_is_that_of_open_clips_bpe_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    from dist_cl.config.validation import OPEN_CLIP_BPE_VOCAB_SIZE

    assert len(SimpleTokenizer().encoder) == OPEN_CLIP_BPE_VOCAB_SIZE
