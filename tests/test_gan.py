"""The GAN family's options: EMA, clipping, spectral norm, lazy R1, d_steps, TTUR, conditioning, reused fakes."""

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from gentrain import GentrainError
from gentrain.models import build, grid_codes
from gentrain.commands.train import lazy_ratio, optimizer_factory
from gentrain.models import losses
from gentrain.loop import Step
from gentrain.models.family import Phase


def gan(size=28, channels=1, classes=0, **cfg):
    return build({"family": "gan", "z_dim": 8, "ch": 8, **cfg}, channels, size, classes)


def test_ema_follows_its_warmup_schedule():
    torch.manual_seed(0)
    model = gan(ema=0.9)
    w = lambda m: m.net[0].weight
    history = []
    for step in range(4):
        with torch.no_grad():
            w(model.G).add_(1.0)  # stands in for an optimizer step
        history.append(w(model.G).clone())
        model.after_step("G", step)
    # update 0 copies G; update n >= 1 uses beta_n = min(0.9, (1 + n) / (10 + n))
    expected = history[0]
    for n in (1, 2, 3):
        beta = min(0.9, (1 + n) / (10 + n))
        expected = beta * expected + (1 - beta) * history[n]
    assert torch.allclose(w(model.G_ema.module), expected, atol=1e-6)
    # sampling reads the EMA weights unless told otherwise
    z = model.noise(3)
    model.eval()
    assert torch.allclose(model.sample(z), torch.tanh(model.G_ema.module(z)))
    model.use_ema = False
    assert torch.allclose(model.sample(z), torch.tanh(model.G(z)))


def test_ema_samples_with_the_batch_norm_statistics_of_its_own_weights():
    """Precise BN: before it samples, the EMA's running statistics are recomputed from its own weights over
    fixed codes, once per update; a reloaded model computes the same ones."""
    torch.manual_seed(0)
    model = gan(ema=0.9)
    for step in range(3):
        with torch.no_grad():
            for p in model.G.parameters():
                p.add_(0.1 * torch.randn_like(p))  # stands in for an optimizer step
        model.after_step("G", step)
    model.G(model.noise(32))  # G's own running statistics move with G, in train mode
    model.eval()
    z = model.noise(6)
    samples = model.sample(z)
    ema = model.G_ema.module
    batches, size = model.G_ema.CODES
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([model.noise(size, generator=g) for _ in range(batches)])
    with torch.no_grad():
        first = ema.net[0](codes[:, :, None, None])  # the activations the first batch norm normalises
    assert torch.allclose(ema.net[1].running_mean, first.mean((0, 2, 3)), atol=1e-5)
    assert not torch.allclose(ema.net[1].running_mean, model.G.net[1].running_mean, atol=1e-3)
    assert not ema.training and not model.G.training  # calibrating leaves the modes as they were

    with torch.no_grad():
        ema.net[1].running_mean.add_(1.0)
    assert not torch.allclose(model.sample(z), samples)  # current: not recomputed until the next update
    model.after_step("G", 3)
    untouched = model.state_dict()["G_ema.module.net.1.running_mean"].clone()
    assert torch.equal(model.state_dict()["G_ema.module.net.1.running_mean"], untouched)  # state_dict() only reads
    model.calibrate_ema()  # what the loop calls before it writes a checkpoint: recomputed, from the moved weights
    saved = model.state_dict()
    assert not torch.allclose(saved["G_ema.module.net.1.running_mean"], untouched)
    with torch.no_grad():
        moved = ema.net[0](codes[:, :, None, None]).mean((0, 2, 3))
    assert torch.allclose(saved["G_ema.module.net.1.running_mean"], moved, atol=1e-5)
    assert not torch.allclose(moved, first.mean((0, 2, 3)), atol=1e-4)
    expected = model.sample(z)

    reloaded = gan(ema=0.9)
    reloaded.load_state_dict(model.state_dict())
    assert torch.allclose(reloaded.eval().sample(z), expected, atol=1e-6)


def test_a_conditional_ema_calibrates_over_the_classes():
    """Code i of the calibration has class i mod num_classes, whatever the batch it falls in."""
    torch.manual_seed(0)
    model = gan(classes=3, conditional=True, ema=0.9)
    model.after_step("G", 0)
    model.eval()
    images = model.sample(model.noise(4), torch.tensor([0, 1, 2, 0]))
    assert images.shape == (4, 1, 28, 28)
    batches, size = model.G_ema.CODES
    g = torch.Generator().manual_seed(0)
    codes = torch.cat([model.noise(size, generator=g) for _ in range(batches)])
    ema = model.G_ema.module
    y = torch.arange(len(codes)) % 3
    with torch.no_grad():
        first = ema.net[0](torch.cat([codes, ema.embed(y)], 1)[:, :, None, None])
    assert torch.allclose(ema.net[1].running_mean, first.mean((0, 2, 3)), atol=2e-6)
    assert torch.allclose(ema.net[1].running_var, first.var((0, 2, 3)), rtol=0.05)


def test_an_ema_gan_pickles_and_loading_weights_recomputes_its_statistics():
    import pickle

    model = gan(ema=0.9)
    model.after_step("G", 0)
    model.eval().sample(model.noise(2))
    assert int(model.G_ema.calibrated_at) == 1
    pickle.dumps(model)
    model.load_state_dict(gan(ema=0.9).state_dict())
    assert int(model.G_ema.calibrated_at) == -1


def test_wgan_clips_d_after_its_step_only():
    model = gan(loss="wgan", clip=0.01)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    model.after_step("G", 0)
    assert all((p == 0.5).all() for p in model.D.parameters())
    model.after_step("D", 0)
    assert all(p.abs().max() <= 0.01 for p in model.D.parameters())
    assert all((p == 0.5).all() for p in model.G.parameters())


def test_spectral_norm_bounds_every_d_layer():
    torch.manual_seed(0)
    model = gan(sn=True)
    model.train()
    x = torch.randn(4, 1, 28, 28)
    for _ in range(30):  # one power iteration per forward pass
        model.D(x)
    convs = [m for m in model.D.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.D.modules())  # d_norm=auto
    for m in convs:
        sigma = torch.linalg.matrix_norm(m.weight.flatten(1), ord=2)
        assert abs(sigma.item() - 1) < 0.05


def test_d_norm_auto_drops_batch_norm_for_wgan_gp_and_spectral_norm_only():
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm2d) for x in m.D.modules())
    assert has_bn(gan()) and has_bn(gan(loss="hinge")) and has_bn(gan(r1=1.0))
    assert not has_bn(gan(loss="wgan_gp")) and not has_bn(gan(sn=True)) and not has_bn(gan(r1=1.0, d_norm="none"))
    assert has_bn(gan(loss="wgan_gp", d_norm="batch"))


def test_lazy_r1_is_a_phase_of_its_own_every_k_steps_scaled_by_k():
    torch.manual_seed(0)
    model = gan(r1=2.0, r1_every=4, d_norm="none")
    assert model.phases == (Phase("D", "D"), Phase("Dreg", "D", 4), Phase("G", "G"))  # StyleGAN2's Dreg
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    _, stats = model.loss("D", x, None, step=4)
    assert "D/r1" not in stats  # D's main phase leaves R1 to Dreg
    reg, stats = model.loss("Dreg", x, None, step=4)
    # gamma / 2 * k * R1 on the real batch
    assert torch.allclose(reg, 0.5 * 2.0 * 4 * losses.r1_penalty(model.D, x), rtol=1e-6)
    assert torch.allclose(stats["D/r1"], losses.r1_penalty(model.D, x), rtol=1e-6)
    # R1 every step stays inside D's own phase, as StyleGAN2's Dboth
    eager = gan(r1=2.0, r1_every=1, d_norm="none")
    assert [p.name for p in eager.phases] == ["D", "G"] and "D/r1" in eager.loss("D", x, None, 0)[1]


def test_lazy_r1_keeps_ds_adam_per_batch_dynamics():
    """StyleGAN2-ADA's mb_ratio: an optimizer that a lazy phase also steps every k steps gets lr * c and
    betas ** c with c = k / (k + 1) for one main update per step (n / (n + 1 / k) for n)."""
    model = gan(r1=1.0, r1_every=4, d_norm="none", d_steps=2)
    assert lazy_ratio(model.phases, "D") == pytest.approx(2 / (2 + 1 / 4)) and lazy_ratio(model.phases, "G") == 1
    make = optimizer_factory(OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-4,
                                               "betas": [0.0, 0.99], "lr_D": 4e-4}), torch.device("cpu"))
    group = make("D", model.D.parameters(), 0.8).param_groups[0]
    assert group["lr"] == pytest.approx(4e-4 * 0.8) and group["betas"] == pytest.approx((0.0, 0.99 ** 0.8))
    assert make("G", model.G.parameters()).param_groups[0]["lr"] == 2e-4


def test_d_steps_repeat_the_d_phase():
    assert [p.name for p in gan(d_steps=5).phases] == ["D"] * 5 + ["G"]


@pytest.mark.parametrize("reuse", [False, True])
def test_reused_fakes_are_the_last_d_phases_scored_by_the_updated_d(reuse):
    """model.reuse_fakes: G runs forward once per D phase and not in its own, and G's gradient is that of its
    loss on the last D phase's fakes (codes and classes), scored by D after D's step (the PyTorch DCGAN
    example's step). Without it, G's phase draws fakes of its own."""
    torch.manual_seed(0)
    model = gan(classes=10, conditional=True, loss="hinge", d_steps=2, reuse_fakes=reuse)
    records = ("G",) if reuse else ()
    assert model.phases == (Phase("D", "D"), Phase("D", "D", records=records), Phase("G", "G"))
    optimizers = {"D": torch.optim.Adam(model.D.parameters(), lr=0.01),
                  "G": torch.optim.SGD(model.G.parameters(), lr=0.0)}  # G keeps its weights and its .grad
    scalers = {o: torch.amp.GradScaler("cpu", enabled=False) for o in optimizers}
    inputs = [(torch.rand(4, 1, 28, 28) * 2 - 1, torch.randint(0, 10, (4,))) for _ in model.phases]
    codes = []
    model.G.register_forward_hook(lambda m, args, out: codes.append([a.clone() for a in args]))
    d_before = copy.deepcopy(model.D)
    plain_attributes = lambda m: {k: (type(v), id(v)) for k, v in vars(m).items() if not k.startswith("_")}
    attributes = plain_attributes(model)
    Step(model, optimizers, scalers, torch.device("cpu"), None)(model.phases, inputs, 0)
    assert len(codes) == 3 - reuse
    assert plain_attributes(model) == attributes  # nothing handed over through the model: the step's carry did it
    z, y = codes[-1]
    assert torch.equal(y, inputs[1 if reuse else 2][1])  # the last D phase's classes, or G's own batch's
    gradient = lambda D: torch.autograd.grad(model.loss_fn.g(None, D(torch.tanh(model.G(z, y)), y).float()),
                                             list(model.G.parameters()))
    for got, want, old in zip([p.grad for p in model.G.parameters()], gradient(model.D), gradient(d_before)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert not all(torch.allclose(w, o, rtol=1e-4, atol=1e-7) for w, o in zip(gradient(model.D), gradient(d_before)))


def test_reused_fakes_train_and_resume_through_the_cli(gentrain, tmp_path):
    """With lazy R1 between the D and G phases, DiffAugment and the EMA: it trains, and resumes."""
    run = tmp_path / "run"
    gentrain("model=gan", "model.reuse_fakes=true", "model.r1=0.1", "model.r1_every=2", "model.augment=[translation]",
             "trainer.steps=4", "trainer.batch_size=16", "trainer.log_every=2", "model.ch=8", f"hydra.run.dir={run}")
    gentrain(f"resume={run}", "trainer.steps=6")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6] and all(math.isfinite(r["G/loss"]) for r in records)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["config"]["model"]["reuse_fakes"]


def test_ttur_gives_each_phase_its_learning_rate():
    make = optimizer_factory(OmegaConf.create({"_target_": "torch.optim.Adam", "_partial_": True, "lr": 2e-4,
                                               "betas": [0.0, 0.9], "lr_D": 4e-4, "lr_G": None}),
                             torch.device("cpu"))
    model = gan()
    d, g = make("D", model.D.parameters()), make("G", model.G.parameters())
    assert d.param_groups[0]["lr"] == 4e-4 and g.param_groups[0]["lr"] == 2e-4
    assert d.param_groups[0]["betas"] == (0.0, 0.9)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_models_follow_their_labels(arch):
    torch.manual_seed(0)
    model = gan(size=32, channels=3, classes=10, arch=arch, conditional=True).eval()
    for m in model.modules():  # conditional batch norm starts as plain batch norm: make the classes differ
        if isinstance(m, torch.nn.Embedding):
            torch.nn.init.normal_(m.weight)
    z = model.noise(1).repeat(4, 1)
    out = model.sample(z, torch.tensor([3, 3, 7, 7]))
    assert torch.allclose(out[0], out[1]) and not torch.allclose(out[0], out[2])  # same z, other class
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    scores = model.D(x, torch.tensor([1, 2, 3, 4]))
    assert scores.shape == (4, 1) and not torch.allclose(scores, model.D(x, torch.tensor([5, 6, 7, 8])))
    for phase in model.phases:
        loss, _ = model.loss(phase.name, x, torch.tensor([0, 1, 2, 3]))
        assert torch.isfinite(loss)


def test_grid_codes_lay_out_one_class_per_row():
    model = gan(classes=10, conditional=True)
    z, y, nrow = grid_codes(model, 64, torch.Generator().manual_seed(0))
    assert nrow == 6 and len(z) == 60 and y.tolist() == [c for c in range(10) for _ in range(6)]
    z, y, nrow = grid_codes(model, 16, label=3)
    assert (y == 3).all() and len(z) == 16
    z, y, nrow = grid_codes(gan(), 16)
    assert y is None and nrow is None and len(z) == 16


@pytest.mark.parametrize("cfg, message", [
    ({"loss": "hinge2"}, "model.loss='hinge2'"),
    ({"arch": "vit"}, "model.arch='vit'"),
    ({"arch": "mlp"}, "model.arch=mlp is for 2-D points"),
    ({"d_steps": 0}, "model.d_steps must be a positive integer"),
    ({"ema": 1.0}, "0 <= model.ema < 1"),
    ({"augment": "color,flip"}, "model.augment: 'flip' is not a DiffAugment transform"),
    ({"conditional": True}, "model.conditional=true needs a labelled dataset"),
])
def test_bad_gan_settings_are_user_errors(cfg, message):
    with pytest.raises(GentrainError, match=message.replace("(", r"\(").replace(".", r"\.")):
        gan(**cfg)
