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


def test_penalties_pass_class_labels_to_a_conditional_d():
    seen = []

    class Cond(Linear2D):
        def forward(self, x, y):
            seen.append(y)
            return super().forward(x)

    y = torch.tensor([1, 0])
    losses.gradient_penalty(Cond([1.0, 0.0]), torch.zeros(2, 2), torch.ones(2, 2), y)
    losses.r1_penalty(Cond([1.0, 0.0]), torch.zeros(2, 2), None, y)
    assert all(s is y for s in seen) and len(seen) == 2


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
