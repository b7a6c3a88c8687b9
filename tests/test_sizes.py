"""Images of your own at 16 to 512 px: every architecture at every size it takes, the lightweight GAN's
reconstruction loss and adaptive augmentation against hand-computed values, and real folders through the
CLI."""

import json
import shutil

import pytest
import torch

from conftest import FAST, assert_one_line_error
from gentrain import GentrainError
from gentrain.models import build
from gentrain.models.gan import EMA
from gentrain.models.lightweight import quadrant, reconstruction_loss
from gentrain.models.nets import SIZES, plan

POWERS = [s for s in SIZES if s & (s - 1) == 0]
CONFIGS = [
    ({"family": "gan", "arch": "dcgan", "ch": 4, "z_dim": 8}, SIZES),
    ({"family": "gan", "arch": "resnet", "ch": 4, "z_dim": 8}, SIZES),
    ({"family": "gan", "arch": "lightweight", "ch": 4, "z_dim": 8}, POWERS),
    ({"family": "vae", "arch": "conv", "ch": 4, "z_dim": 4}, SIZES),
    ({"family": "vae", "arch": "resnet", "ch": 4, "z_dim": 4}, SIZES),
    ({"family": "vqvae", "ch": 4, "z_dim": 4, "prior_ch": 4, "prior_layers": 2, "num_codes": 8}, [s for s in SIZES if s <= 256]),
]


def test_one_rule_sizes_every_image():
    assert plan(28) == (7, 2) and plan(32) == (4, 3) and plan(64) == (4, 4)  # the sizes before the rule
    assert [plan(s) for s in (16, 128, 256, 512)] == [(4, 2), (4, 5), (4, 6), (4, 7)]
    for size in SIZES:
        base, n = plan(size)
        assert base * 2 ** n == size


@pytest.mark.parametrize("cfg, size", [(c, s) for c, sizes in CONFIGS for s in sizes],
                         ids=[f"{c['family']}-{c.get('arch', '')}-{s}" for c, sizes in CONFIGS for s in sizes])
def test_every_architecture_trains_a_step_at_every_size(cfg, size):
    torch.manual_seed(0)
    model = build(cfg, 3, size)
    x = torch.rand(2, 3, size, size) * 2 - 1
    optimizers = {o: torch.optim.Adam(model.phase_parameters(o), lr=1e-3) for o in model.optimizers}
    for phase in model.phases:
        loss, stats = model.loss(phase.name, x, None, 0)
        assert loss.shape == () and torch.isfinite(loss), phase
        optimizers[phase.opt].zero_grad()
        loss.backward()
        optimizers[phase.opt].step()
        model.after_step(phase.name, 0)
    model.eval()
    if cfg["family"] != "vqvae" or size <= 32:  # a VQ-VAE samples cell by cell: large grids are slow here
        with torch.no_grad():
            assert model.sample(model.noise(2)).shape == (2, 3, size, size)


def test_the_residual_vae_takes_a_latent_grid_above_64_px():
    small, large = (build({"family": "vae", "arch": "resnet", "ch": 4, "z_dim": 4}, 3, s) for s in (64, 128))
    assert small.latent_shape == (4,) and large.latent_shape == (4, 8, 8) and large.code_shape == [4, 8, 8]
    x = torch.rand(3, 3, 128, 128) * 2 - 1
    mu, logvar = large.encode(x)
    assert mu.shape == (3, 4, 8, 8) and large.log_weights(x, 5).shape == (3, 5)
    rate, distortion = large.rate_distortion(x)
    assert rate.shape == distortion.shape == (3,)


@pytest.mark.parametrize("cfg, message", [
    ({"family": "gan"}, "dataset.image_size must be one of 16, 28, 32, 64, 128, 256, 512, got 100"),
    ({"family": "gan", "arch": "lightweight"}, "dataset.image_size must be one of"),
])
def test_unsupported_sizes_are_one_line(cfg, message):
    with pytest.raises(GentrainError, match=message):
        build(cfg, 3, 100)
    with pytest.raises(GentrainError, match="dataset.image_size must be one of"):
        build(cfg, 3, 1024)
    with pytest.raises(GentrainError, match="power-of-two image side"):
        build({"family": "gan", "arch": "lightweight"}, 1, 28)


def test_quadrants_are_gathered_per_example():
    t = torch.arange(2 * 1 * 4 * 4, dtype=torch.float).view(2, 1, 4, 4)
    q = quadrant(t, torch.tensor([0, 3]))
    assert q[0].tolist() == [[[0.0, 1.0], [4.0, 5.0]]]  # top-left of the first
    assert q[1].tolist() == [[[26.0, 27.0], [30.0, 31.0]]]  # bottom-right of the second


def test_the_reconstruction_loss_on_a_hand_built_example():
    """L_recons = MSE(decode_all(f8), downsampled x) + MSE(decode_part(quadrant of f16), that quadrant of x
    resized): with decoders that return zeros, the squared pixels of the targets."""
    x = torch.zeros(1, 1, 16, 16)
    x[..., :8, :8], x[..., :8, 8:], x[..., 8:, :8], x[..., 8:, 8:] = 0.2, 0.4, -0.6, 0.8
    zeros = lambda f: torch.zeros(1, 1, 16, 16)
    torch.manual_seed(3)
    q = int(torch.randint(0, 4, (1,)))
    torch.manual_seed(3)
    loss = reconstruction_loss(x, torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 16, 16), zeros, zeros, side=16)
    whole = (0.2 ** 2 + 0.4 ** 2 + 0.6 ** 2 + 0.8 ** 2) / 4
    part = [0.2, 0.4, -0.6, 0.8][q] ** 2
    assert loss.item() == pytest.approx(whole + part, rel=1e-6)


def test_the_lightweight_d_trains_its_reconstruction():
    torch.manual_seed(0)
    model = build({"family": "gan", "arch": "lightweight", "ch": 8, "z_dim": 16}, 3, 32)
    opt = torch.optim.Adam(model.D.parameters(), lr=1e-3)
    ramp = torch.linspace(-1, 1, 32)
    x = torch.stack([ramp[None, :] * ramp[:, None], ramp[None, :].expand(32, 32), -ramp[:, None].expand(32, 32)])
    x = x[None].repeat(4, 1, 1, 1)  # smooth images, the same quadrant structure in each
    first = None
    for _ in range(30):
        _, recons = model.D(x, reconstruct=True)
        opt.zero_grad()
        recons.backward()
        opt.step()
        first = first if first is not None else recons.item()
    assert recons.item() < 0.5 * first, (first, recons.item())


def ada_model(interval=1, kimg=0.01):
    return build({"family": "gan", "ch": 4, "z_dim": 4, "augment": ["translation"], "augment_p": "auto",
                  "ada_interval": interval, "ada_kimg": kimg}, 1, 16)


def test_adaptive_augmentation_follows_the_overfitting_heuristic():
    """r_t = E[sign(D(x_real))] above the target raises p by images / (ada_kimg * 1000) per update, below it
    lowers it, and p stays in [0, 1]."""
    model = ada_model(interval=2, kimg=0.02)  # 20 images move p from 0 to 1
    confident, unsure = torch.full((4, 1), 3.0), torch.tensor([[1.0], [-1.0], [-1.0], [1.0]])
    for step in range(4):  # D overfits: sign +1 on every real image, r_t = 1 > 0.6
        model._observe(confident)
        model._adapt(step)
    assert model.augment_p.item() == pytest.approx(2 * 8 / 20)  # two updates of 8 images each
    for step in range(4, 10):
        model._observe(confident)
        model._adapt(step)
    assert model.augment_p.item() == 1.0  # clamped
    for step in range(10, 14):  # r_t = 0 < 0.6: p comes down
        model._observe(unsure)
        model._adapt(step)
    assert model.augment_p.item() == pytest.approx(1 - 2 * 8 / 20)
    # between updates p holds still, and the sums are kept
    model._observe(confident)
    model._adapt(14)
    assert model.augment_p.item() == pytest.approx(1 - 2 * 8 / 20) and model.ada_images.item() == 4


def test_augmentation_with_p_zero_leaves_images_alone():
    model = ada_model()
    from gentrain.models import augment

    x = torch.rand(6, 1, 16, 16)
    assert torch.equal(augment.diff_augment(x, model.augment, model.augment_p), x)  # p = 0 at the start
    assert not torch.equal(augment.diff_augment(x, model.augment, 1.0), x)


@pytest.fixture(scope="module")
def emoji64(tmp_path_factory, emoji_dir):
    folder = tmp_path_factory.mktemp("emoji64")
    for f in sorted(emoji_dir.glob("*.png"))[:64]:
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.slow
def test_a_folder_at_128_px_trains_with_the_lightweight_gan_and_samples(gentrain, tmp_path, emoji64, monkeypatch):
    # The EMA's batch-norm calibration over 1,024 codes at 128 px is most of this test's CPU time (a minute);
    # 64 codes run the same path (tests/test_gan.py checks what it computes).
    monkeypatch.setattr(EMA, "CODES", (2, 32))
    run = tmp_path / "run"
    gentrain("dataset=folder", f"dataset.root={emoji64}", "experiment=folder_128", "model.ch=8", "model.z_dim=32",
             "trainer.steps=64", "trainer.log_every=16", "trainer.sample_every=32", "trainer.ckpt_every=32",
             f"hydra.run.dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 64 and ckpt["data"] == {"channels": 3, "image_size": 128, "num_classes": 0}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"D/recons", "D/augment_p", "G/loss"} <= set(records[-1])
    gentrain("sample", run, "n=4", f"out={tmp_path / 'grid.png'}")
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as img:
        assert img.size == (2 + 2 * 130, 2 + 2 * 130) and img.mode == "RGB"


@pytest.mark.slow
def test_a_folder_at_128_px_trains_with_the_vae_preset(gentrain, tmp_path, emoji64):
    run = tmp_path / "run"
    gentrain("dataset=folder", f"dataset.root={emoji64}", "experiment=folder_vae_128", "model.ch=8",
             "trainer.steps=4", "trainer.batch_size=8", *[a for a in FAST if "batch" not in a and "ch=" not in a],
             f"hydra.run.dir={run}")
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["config"]["model"]["arch"] == "resnet"
    gentrain("sample", run, "mode=reconstruct", "n=4", f"data_root={emoji64}", f"out={tmp_path / 'recon.png'}")
    assert (tmp_path / "recon.png").is_file()


def test_adaptive_augmentation_resumes_exactly(gentrain, tmp_path):
    args = ["model.augment=[translation]", "model.augment_p=auto", "model.ada_interval=1", "model.ada_kimg=1",
            *FAST, "trainer.log_every=1"]
    gentrain(*args, "trainer.steps=6", f"hydra.run.dir={tmp_path / 'straight'}")
    gentrain(*args, "trainer.steps=3", f"hydra.run.dir={tmp_path / 'split'}")
    gentrain(f"resume={tmp_path / 'split'}", "trainer.steps=6")
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in ("straight", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a) and a["augment_p"] > 0  # p itself rose, and resumed exactly
    line = lambda r: [json.loads(x)["D/augment_p"] for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
    assert line("straight") == line("split")


def test_bad_sizes_through_the_cli_are_one_line(gentrain, tmp_path):
    assert_one_line_error(gentrain("dataset.image_size=100", check=False), "dataset.image_size must be one of")
    assert_one_line_error(gentrain("dataset.image_size=1024", check=False), "dataset.image_size must be one of")
    assert_one_line_error(gentrain("model.arch=lightweight", check=False), "power-of-two image side")
