"""The VAE's objective controls (beta warm-up, free bits, IWAE), dynamic binarisation, the conditional
VAE and the rate/distortion report, on fixed tensors and through the CLI."""

import json
import math

import pytest
import torch

from conftest import FAST, assert_one_line_error
from gentrain import GentrainError, checkpoint
from gentrain.models import build
from gentrain.models.vae import kl_per_dim
from gentrain.checkpoint import load_model

X = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1


def vae(**kw):
    torch.manual_seed(0)
    return build({"family": "vae", "z_dim": 6, "ch": 8, **kw}, 1, 28)


def test_kl_warmup_grows_beta_linearly_then_holds():
    model = vae(beta=2.0, kl_warmup_steps=10)
    for step, beta in ((0, 0.0), (5, 1.0), (10, 2.0), (50, 2.0)):
        loss, stats = model.loss("vae", X, None, step)
        assert stats["vae/beta"].item() == pytest.approx(beta)
        assert loss.item() == pytest.approx((stats["vae/recon"] + beta * stats["vae/kl"]).item(), rel=1e-5)


def test_free_bits_floor_each_dimension_batch_mean_kl():
    model, lam = vae(free_bits=0.5), 0.5
    with torch.no_grad():  # push half the latent means away from 0, so some dimensions are above the floor
        model.encoder.net[-1].bias[:3] += 1.5
    loss, stats = model.loss("vae", X)
    per_dim = kl_per_dim(*model.encode(X)).mean(0)
    assert (per_dim < lam).any() and (per_dim > lam).any()
    assert (loss - stats["vae/recon"]).item() == pytest.approx(per_dim.clamp(min=lam).sum().item(), rel=1e-5)
    assert stats["vae/kl"].item() == pytest.approx(per_dim.sum().item(), rel=1e-5)  # the true KL is reported


def test_iwae_objective_is_tighter_than_the_elbo_and_trains_both_networks():
    model = vae(k=8)
    loss, stats = model.loss("vae", X)
    assert loss.item() <= stats["vae/nelbo"].item()  # -log mean w <= -mean log w (Jensen), per sample set
    loss.backward()
    for net in (model.encoder, model.decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_dynamic_binarisation_draws_each_pixel_from_its_intensity():
    model = vae(binarize=True)
    grey = torch.full((4000, 1, 28, 28), 0.3 * 2 - 1)  # intensity 0.3 everywhere
    seen = model.observe(grey)
    assert set(seen.unique().tolist()) == {-1.0, 1.0}
    assert ((seen + 1) / 2).mean().item() == pytest.approx(0.3, abs=0.002)
    assert not torch.equal(model.observe(grey[:8]), model.observe(grey[:8]))  # a fresh draw every read


@pytest.mark.parametrize("kw, fragment", [
    ({"binarize": True, "likelihood": "gaussian"}, "only model.likelihood=bernoulli"),
    ({"k": 4, "beta": 2.0}, "IWAE bound"),
    ({"k": 0}, "model.k must be a positive integer"),
    ({"likelihood": "poisson"}, "choose from bernoulli, gaussian, dlogistic"),
    ({"conditional": True}, "needs a labelled dataset"),
])
def test_bad_vae_settings_are_named(kw, fragment):
    with pytest.raises(GentrainError, match=fragment):
        vae(**kw)


def test_conditional_vae_trains_samples_a_class_and_reconstructs(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", "model.conditional=true", *FAST, "trainer.steps=2", f"hydra.run.dir={run}")
    gentrain("sample", f"ckpt={run}", "class=7", "n=8", f"out={tmp_path / 'sevens'}/")
    assert len(list((tmp_path / "sevens").glob("*.png"))) == 8
    gentrain("sample", f"ckpt={run}", "mode=reconstruct", "n=8", f"out={tmp_path / 'recon.png'}")
    assert (tmp_path / "recon.png").stat().st_size > 0


def test_eval_reports_rate_and_distortion_of_a_binarised_vae(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("model=vae", "model.binarize=true", *FAST, "trainer.steps=30", f"hydra.run.dir={run}")
    gentrain("eval", f"ckpt={run}", "metrics=[nll]", "metrics.k=50", "metrics.nll_n=200")
    result = json.loads((run / "checkpoints" / "eval.json").read_text())
    m = result["metrics"]
    # -ELBO = distortion + rate; the two sides come from different samples of z, so up to noise
    assert m["distortion"] + m["rate_bits"] * math.log(2) == pytest.approx(m["nelbo"], rel=0.05)
    assert m["nll"] <= m["nelbo"] and m["rate_bits"] > 0
    assert "dynamically binarised" in result["nll_setup"]["meaning"]
    again = gentrain("eval", f"ckpt={run}", "metrics=[nll]", "metrics.k=50", "metrics.nll_n=200")
    assert json.loads((run / "checkpoints" / "eval.json").read_text())["metrics"] == m, again.stdout


def test_an_iwae_setting_that_cannot_train_is_one_line(gentrain):
    assert_one_line_error(gentrain("model=vae", "model.k=5", "model.beta=4", *FAST, "trainer.steps=2", check=False),
                          "IWAE bound")


@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_resnet_vae_shapes_and_per_example_independence(size, channels):
    torch.manual_seed(0)
    model = build({"family": "vae", "z_dim": 6, "ch": 8, "arch": "resnet"}, channels, size)
    x = torch.rand(5, channels, size, size) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 6)
    assert model.reconstruct(x).shape == x.shape and model.sample(model.noise(3)).shape == (3, channels, size, size)
    # no batch norm: an image's code does not depend on the other images of its batch (IWAE, DDP)
    assert torch.allclose(model.encode(x[:2])[0], mu[:2], atol=1e-6)
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.encoder.modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_default_arch_keeps_the_state_dict_keys_of_checkpoints_from_before_it():
    keys = list(vae().state_dict())
    assert keys == list(vae(arch="conv").state_dict())
    assert all(k.startswith(("encoder.net.", "decoder.net.")) for k in keys)
    with pytest.raises(GentrainError, match="model.arch='dcgan' is unknown for model=vae; choose from conv, resnet"):
        vae(arch="dcgan")


def test_resnet_vae_trains_through_the_cli(gentrain, tmp_path):
    gentrain("model=vae", "model.arch=resnet", "model.conditional=true", *FAST, "trainer.steps=2",
             f"hydra.run.dir={tmp_path}")
    ckpt = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["model"]["arch"] == "resnet" and any(k.startswith("encoder.0.blocks.") for k in ckpt["model"])
    model, _ = load_model(tmp_path / "checkpoints" / "last.pt", torch.device("cpu"))
    assert model.reconstruct(X[:2], torch.tensor([3, 7])).shape == (2, 1, 28, 28)


def test_a_checkpoint_from_before_arch_loads_as_the_conv_vae(tmp_path):
    """A run from before model.arch existed: its stored model config has no arch key."""
    model_cfg = {"family": "vae", "z_dim": 6, "ch": 8}
    checkpoint.save({"family": "vae", "step": 1, "model": vae().state_dict(),
                     "config": {"model": model_cfg, "dataset": {"name": "mnist", "image_size": 28}},
                     "data": {"channels": 1, "image_size": 28, "num_classes": 0}}, tmp_path / "old.pt")
    model, _ = load_model(tmp_path / "old.pt", torch.device("cpu"))
    assert torch.equal(model.decode(torch.zeros(1, 6)), vae().eval().decode(torch.zeros(1, 6)))
