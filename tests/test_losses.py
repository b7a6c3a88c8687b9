"""Every GAN loss and regulariser against values computed by hand on tiny fixed inputs."""

import math

import pytest
import torch
from torch import nn

from gentrain.models import build, losses

REAL, FAKE = torch.tensor([2.0, -0.5]), torch.tensor([-1.0, 1.5])


@pytest.mark.parametrize("name, d_expected, g_expected", [
    # ns/minimax: -log sigmoid(r) - log(1 - sigmoid(f)) for D; -log sigmoid(f) or log(1 - sigmoid(f)) for G
    ("ns", (math.log1p(math.exp(-2)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(-1)) + math.log1p(math.exp(1.5))) / 2,
     (math.log1p(math.exp(1)) + math.log1p(math.exp(-1.5))) / 2),
    ("minimax", None, -(math.log1p(math.exp(-1)) + math.log1p(math.exp(1.5))) / 2),
    # wgan: E[D(G(z))] - E[D(x)] = 0.25 - 0.75; G: -E[D(G(z))]
    ("wgan", 0.25 - 0.75, -0.25),
    ("wgan_gp", 0.25 - 0.75, -0.25),
    # hinge: mean(relu(1 - [2, -0.5])) + mean(relu(1 + [-1, 1.5])) = (0 + 1.5) / 2 + (0 + 2.5) / 2
    ("hinge", 0.75 + 1.25, -0.25),
    # lsgan: 1/2 mean((r - 1)^2) + 1/2 mean(f^2) = 1/2 (1 + 2.25) / 2 + 1/2 (1 + 2.25) / 2; G: 1/2 mean((f - 1)^2)
    ("lsgan", 0.25 * 3.25 + 0.25 * 3.25, 0.25 * (4 + 0.25)),
    # ragan: real - mean(fake) = [1.75, -0.75], fake - mean(real) = [-1.75, 0.75]; D: softplus(-(r - f.mean()))
    # + softplus(f - r.mean()), means over the pair; G: the same with real and fake swapped
    ("ragan", math.log1p(math.exp(-1.75)) + math.log1p(math.exp(0.75)),
     math.log1p(math.exp(1.75)) + math.log1p(math.exp(-0.75))),
    # rpgan, pair by pair: D: mean(softplus(f - r)) = mean(softplus([-3, 2])); G: mean(softplus(r - f)) = mean(softplus([3, -2]))
    ("rpgan", (math.log1p(math.exp(-3)) + math.log1p(math.exp(2))) / 2,
     (math.log1p(math.exp(3)) + math.log1p(math.exp(-2))) / 2),
])
def test_losses_match_hand_computed_values(name, d_expected, g_expected):
    loss = losses.LOSSES[name]
    if d_expected is not None:
        assert math.isclose(loss.d(REAL, FAKE).item(), d_expected, rel_tol=1e-6)
    assert math.isclose(loss.g(REAL if loss.g_reads_real else None, FAKE).item(), g_expected, rel_tol=1e-6)


def test_probabilistic_losses_stay_finite_where_sigmoid_saturates():
    big = torch.tensor([100.0, -100.0])
    for name in ("ns", "minimax"):
        loss = losses.LOSSES[name]
        assert torch.isfinite(loss.d(big, -big)) and torch.isfinite(loss.g(None, -big))


class Linear2D(nn.Module):
    """D(x) = w . x: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x @ self.w[:, None]


def test_gradient_penalty_on_a_known_function():
    D = Linear2D([3.0, 4.0])  # ||grad|| = 5 at every x_hat, so the penalty is (5 - 1)^2
    real, fake = torch.randn(8, 2), torch.randn(8, 2)
    gp = losses.gradient_penalty(D, real, fake)
    assert math.isclose(gp.item(), 16.0, rel_tol=1e-6)
    gp.backward()  # the penalty trains D: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    assert torch.allclose(D.w.grad, 2 * 4 * torch.tensor([3.0, 4.0]) / 5)


def test_r1_penalty_on_a_known_function():
    class Square(nn.Module):  # D(x) = a ||x||^2, input gradient 2 a x
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(1.5))

        def forward(self, x):
            return self.a * x.pow(2).sum(1, keepdim=True)

    D, real = Square(), torch.tensor([[1.0, 0.0], [1.0, 2.0]])
    r1 = losses.r1_penalty(D, real)
    # ||2 a x||^2 = 4 a^2 ||x||^2 = 9 * [1, 5] -> mean 27
    assert math.isclose(r1.item(), 27.0, rel_tol=1e-6)
    r1.backward()
    assert math.isclose(D.a.grad.item(), 2 * 27.0 / 1.5, rel_tol=1e-6)  # d/da of 4 a^2 c = 8 a c = 2 r1 / a
    assert real.grad is None  # the caller's batch is left alone


def test_rpgan_pairs_each_real_with_its_own_fake():
    """Swapping the fakes between pairs changes RpGAN's loss (each margin counts), not RaGAN's average."""
    real, fake = torch.tensor([3.0, 0.0]), torch.tensor([1.0, -2.0])
    swapped = fake.flip(0)
    assert not math.isclose(losses.d_loss_rpgan(real, fake).item(), losses.d_loss_rpgan(real, swapped).item())
    assert math.isclose(losses.d_loss_ragan(real, fake).item(), losses.d_loss_ragan(real, swapped).item())
    # D and G's losses are one function of the margin D(x) - D(G(z)), mirrored: f(-m) and f(m)
    assert torch.allclose(losses.g_loss_rpgan(real, fake), losses.d_loss_rpgan(fake, real))


def test_r2_penalty_and_its_gradient_against_autograd_on_a_tiny_d():
    """R2 = E_z ||grad_x D(G(z))||^2 on a two-layer D; its value against the input gradient autograd gives
    one sample at a time, and its gradient with respect to D's weights against torch.autograd.gradcheck's
    finite differences (the second-order path D's update takes)."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1, bias=False)).double()  # D's last bias: no input gradient
    fake = torch.randn(5, 3, dtype=torch.float64)
    r2 = losses.r2_penalty(D, None, fake)
    norms = []
    for x in fake:
        x = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(D(x[None]).sum(), x)
        norms.append(g.pow(2).sum())
    assert torch.allclose(r2.double(), torch.stack(norms).mean(), rtol=1e-10)
    assert fake.grad is None and not fake.requires_grad  # the caller's batch is left alone
    weights = list(D.parameters())

    def penalty(*ws):
        W1, b1, W2 = ws
        f = lambda x: torch.tanh(x @ W1.T + b1) @ W2.T
        x = fake.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        return g.pow(2).sum(1).mean()

    assert torch.allclose(penalty(*weights), r2.double())
    assert torch.autograd.gradcheck(penalty, [w.detach().clone().requires_grad_(True) for w in weights])
    r2.backward()  # and the penalty's own backward gives autograd's gradient of that function
    expected = torch.autograd.grad(penalty(*weights), weights)
    assert all(torch.allclose(w.grad, e) for w, e in zip(weights, expected))


def test_r1_and_r2_at_one_interval_share_a_dreg_phase_and_at_two_run_apart():
    s = {"family": "gan", "loss": "rpgan", "z_dim": 8, "ch": 8, "r1": 0.1, "r2": 0.2}
    one = build({**s, "r1_every": 4, "r2_every": 4}, 1, 28)
    assert [p.name for p in one.phases] == ["D", "Dreg", "G"] and one.phases[1].every == 4
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    loss, stats = one.loss("Dreg", x)
    assert set(stats) == {"D/r1", "D/r2"}
    assert torch.allclose(loss, 4 * (0.05 * stats["D/r1"] + 0.1 * stats["D/r2"]))
    two = build({**s, "r1_every": 2, "r2_every": 3}, 1, 28)
    assert [(p.name, p.every) for p in two.phases] == [("D", 1), ("Dreg2", 2), ("Dreg3", 3), ("G", 1)]
    assert set(two.loss("Dreg2", x)[1]) == {"D/r1"} and set(two.loss("Dreg3", x)[1]) == {"D/r2"}
    every_step = build({**s, "r1_every": 1, "r2_every": 1}, 1, 28)
    assert [p.name for p in every_step.phases] == ["D", "G"]
    assert {"D/r1", "D/r2"} <= set(every_step.loss("D", x)[1])


def test_penalties_pass_class_labels_to_a_conditional_d():
    seen = []

    class Cond(Linear2D):
        def forward(self, x, y):
            seen.append(y)
            return super().forward(x)

    y = torch.tensor([1, 0])
    losses.gradient_penalty(Cond([1.0, 0.0]), torch.zeros(2, 2), torch.ones(2, 2), y)
    losses.r1_penalty(Cond([1.0, 0.0]), torch.zeros(2, 2), None, y)
    losses.r2_penalty(Cond([1.0, 0.0]), None, torch.ones(2, 2), y)
    assert all(s is y for s in seen) and len(seen) == 3


def test_a_new_loss_is_one_function_and_one_table_line(monkeypatch):
    """The least-squares loss with the -1/1 coding (Mao et al. 2017, Eq. 2 with a = -1, b = 1, c = 0),
    added as a test would add it: no change to the GAN family."""
    def d_loss_lsgan_pm1(real, fake):
        return 0.5 * (real - 1).pow(2).mean() + 0.5 * (fake + 1).pow(2).mean()

    monkeypatch.setitem(losses.LOSSES, "lsgan_pm1", losses.Loss(d_loss_lsgan_pm1, lambda real, fake: 0.5 * fake.pow(2).mean()))
    model = build({"family": "gan", "loss": "lsgan_pm1", "z_dim": 8, "ch": 8, "d_norm": "none"}, 1, 28)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.manual_seed(0)
    loss, stats = model.loss("D", x)
    torch.manual_seed(0)
    fake = torch.tanh(model.G(model.noise(4)))
    assert torch.allclose(loss, d_loss_lsgan_pm1(model.D(x), model.D(fake)), rtol=1e-6)
    assert {"D/loss", "D/real", "D/fake"} == set(stats)  # not a logit: raw scores are logged


def test_a_relativistic_loss_scores_real_images_in_gs_phase():
    torch.manual_seed(0)
    model = build({"family": "gan", "loss": "ragan", "z_dim": 8, "ch": 8, "d_norm": "none"}, 1, 28)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    torch.manual_seed(1)
    loss, _ = model.loss("G", x)
    torch.manual_seed(1)
    fake = model.D(torch.tanh(model.G(model.noise(4))))
    assert torch.allclose(loss, losses.g_loss_ragan(model.D(x), fake), rtol=1e-6)
