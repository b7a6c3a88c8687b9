"""Stacked MNIST, the 1,000-mode benchmark, and R3GAN's networks: the data, the modes metric on real and
collapsed samplers, and a run of model.arch=r3gan with RpGAN + R1 + R2 through the CLI."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import FAST, assert_one_line_error
from gentrain import data
from gentrain.metrics import features, scores
from gentrain.models import build
from gentrain.models.r3gan import Block, R3GAND, R3GANG


def stacked(data_root, split="train", n=26_000, seed=0):
    cfg = OmegaConf.create({"name": "stacked_mnist", "root": str(data_root), "image_size": 28, "n": n, "seed": seed})
    return data.load(cfg, split)


def test_stacked_mnist_stacks_three_independent_mnist_digits(data_root):
    images = stacked(data_root, n=5000).images
    assert images.shape == (5000, 3, 28, 28) and images.dtype == torch.uint8
    mnist = data.load(OmegaConf.create({"name": "mnist", "root": str(data_root), "image_size": 28}), "train").images
    # every channel is an MNIST training digit, and the channels are not copies of one another
    keys = {bytes(d.numpy()) for d in mnist[:, 0]}
    assert all(bytes(c.numpy()) in keys for c in images[:50].reshape(-1, 28, 28))
    assert (images[:, 0] != images[:, 1]).flatten(1).any(1).float().mean() > 0.99
    again = stacked(data_root, n=5000).images
    assert torch.equal(images, again)  # drawn once from dataset.seed
    assert not torch.equal(images, stacked(data_root, n=5000, split="test").images)


def test_modes_cover_the_real_stacked_digits_and_few_of_a_collapsed_sampler(data_root, tmp_path):
    """8,000 real stacked digits (the protocol scores 26,000 samples; 8,000 draws leave a mode empty with
    probability e^-8) cover nearly all 1,000 modes at a small KL; a sampler that repeats five images covers
    at most five, at a KL near log(1000 / 5)."""
    cfg = OmegaConf.create({"name": "stacked_mnist", "root": str(data_root), "image_size": 28})
    read = features.digit_reader(cfg, tmp_path, torch.device("cpu"))
    real = stacked(data_root, split="test", n=8_000).images
    modes, kl = scores.stacked_modes(read(data.stacked_digits(real)).view(-1, 3))
    assert modes >= 990 and kl < 0.2
    collapsed = real[:5].repeat(200, 1, 1, 1)
    modes, kl = scores.stacked_modes(read(data.stacked_digits(collapsed)).view(-1, 3))
    assert modes <= 5 and kl == pytest.approx(math.log(1000 / 5), abs=0.2)


def test_stacked_modes_on_hand_made_digits():
    digits = torch.tensor([[1, 2, 3], [1, 2, 3], [0, 0, 7], [9, 9, 9]])
    modes, kl = scores.stacked_modes(digits)
    # p = (1/2, 1/4, 1/4) over three of the 1,000 modes: KL = sum p log(1000 p)
    assert modes == 3 and kl == pytest.approx(0.5 * math.log(500) + 0.5 * math.log(250))
    assert scores.stacked_modes(torch.stack([torch.tensor([a, b, c]) for a in range(10) for b in range(10)
                                             for c in range(10)])) == (1000, pytest.approx(0.0, abs=1e-12))


def test_a_fresh_r3gan_block_is_the_identity_and_the_nets_have_no_normalisation():
    torch.manual_seed(0)
    block, x = Block(32, total_blocks=6), torch.randn(4, 32, 7, 7)
    assert torch.allclose(block(x), x)  # fix-up: the branch's last layer starts at zero
    for size, channels in ((28, 1), (32, 3), (64, 3)):
        G, D = R3GANG(16, channels, size, 8), R3GAND(channels, size, 8)
        z = torch.randn(2, 16)
        image = G(z)
        assert image.shape == (2, channels, size, size) and D(image).shape == (2, 1)
        norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
        assert not any(isinstance(m, norms) for m in [*G.modules(), *D.modules()])
    # with every block the identity, G is its basis, its transitions and its output layer alone: a linear map
    # of z, which it is not once a block's last layer has moved (the leaky ReLUs then count)
    G = R3GANG(16, 1, 28, 8)
    z1, z2 = torch.randn(2, 16), torch.randn(2, 16)
    additive = lambda: torch.allclose(G(z1 + z2), G(z1) + G(z2) - G.out.bias[None, :, None, None], atol=1e-5)
    assert additive()
    with torch.no_grad():
        G.stages[0][0].project.weight.normal_()
    assert not additive()


def test_r3gan_refuses_what_it_does_not_do(gentrain):
    assert_one_line_error(gentrain("model.arch=r3gan", "model.conditional=true", "trainer.steps=1", check=False),
                          "model.arch=r3gan is unconditional")
    assert_one_line_error(gentrain("model.r2=-1", "trainer.steps=1", check=False), "model.r2 >= 0")
    assert_one_line_error(gentrain("dataset=stacked_mnist", "dataset.n=256", "trainer.steps=2", "trainer.eval_every=2",
                                   "trainer.eval_metric=hq", "metrics=[modes]", check=False),
                          "trainer.eval_metric=hq is not computed on stacked_mnist; use modes or mode_kl")


def test_r3gan_on_stacked_mnist_trains_and_eval_prints_modes_and_kl(gentrain, tmp_path):
    run = tmp_path / "run"
    gentrain("experiment=r3gan", "dataset=stacked_mnist", "dataset.n=512", *FAST, "model.ch=8", "trainer.steps=4",
             "optim.betas=[0,0.99]",  # an integer beta1 (torch refuses a mix of ints and floats)
             "model.r1_every=2", "model.r2_every=2", f"hydra.run.dir={run}")
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"D/r1", "D/r2"} <= set(lines[-1]) and all(math.isfinite(v) for v in lines[-1].values())
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["data"] == {"channels": 3, "image_size": 28, "num_classes": 0}
    settings = ckpt["config"]["model"]
    assert (settings["arch"], settings["loss"], settings["r1"] > 0, settings["r2"] > 0) == ("r3gan", "rpgan", True, True)
    proc = gentrain("eval", f"ckpt={run}", "n=300", "device=cpu", f"metrics.cache_dir={tmp_path / 'cache'}",
                    "metrics=[modes]")
    result = json.loads((run / "checkpoints" / "eval.json").read_text())
    assert set(result["metrics"]) == {"modes", "mode_kl"} and 1 <= result["metrics"]["modes"] <= 300
    assert "modes" in proc.stdout and "mode_kl" in proc.stdout
    # the model rebuilds from its checkpoint alone
    model = build(settings, 3, 28)
    model.load_state_dict(ckpt["model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_r3gan_with_lazy_r1_and_r2_captures_on_cuda_and_passes_the_check(gentrain, tmp_path, precision):
    """The preset's step on a GPU (trainer.cuda_graphs=auto): the plain step and the one with the Dreg phase
    (R1 and R2, which draws its own fakes) each captured and checked against the eager step, both kept."""
    from test_fast import captures

    run = tmp_path / "run"
    gentrain("experiment=r3gan", "dataset=stacked_mnist", "dataset.n=2048", *FAST, "trainer.steps=12",
             "model.r1_every=2", "model.r2_every=2", f"trainer.precision={precision}", "trainer.device=cuda",
             f"hydra.run.dir={run}")
    assert sorted(captures(run)) == ["(D, Dreg, G)", "(D, G)"]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(v) for line in lines for v in line.values() if isinstance(v, float))


def test_the_stacked_table_prints_every_row_beside_the_published_ones():
    """scripts/mode_collapse.py --table on the scores behind docs/stability.md: one line per recipe, its mean
    and range over seeds, then the published rows."""
    import subprocess
    import sys

    from conftest import REPO

    out = subprocess.run([sys.executable, str(REPO / "scripts" / "mode_collapse.py"), "--benchmark", "stacked",
                          "--rows", "default,r3gan", "--table", str(REPO / "docs" / "stacked_mnist.json")],
                         capture_output=True, text=True, check=True).stdout
    runs = json.loads((REPO / "docs" / "stacked_mnist.json").read_text())
    default = [r["modes"] for r in runs if r["row"] == "default"]
    line = next(line for line in out.splitlines() if line.startswith("| today's default GAN"))
    assert f"| {sum(default) / len(default):.0f} ({min(default)}-{max(default)}) |" in line
    assert "| R3GAN, Config E (R3GAN, Table 3), published | 1000 | 0.029 | |" in out
    assert "`experiment=r3gan`" in out and "plain DCGAN" not in out  # the rows asked for, no others
