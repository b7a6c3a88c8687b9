"""Model shapes at every supported size, and the losses against hand-computed values."""

import math

import pytest
import torch

from gentrain import GentrainError
from gentrain.models import build
from gentrain.models.losses import d_loss, g_loss_minimax, g_loss_ns
from gentrain.models.likelihoods import discretized_logistic, log_prob
from gentrain.models.vae import kl_std_normal

SIZES = [28, 32, 64]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
def test_gan_shapes(size, channels):
    model = build({"family": "gan", "z_dim": 8, "ch": 8}, channels, size)
    z = model.noise(5)
    x = model.sample(z)
    assert x.shape == (5, channels, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert model.D(x).shape == (5, 1)
    for phase in model.phases:
        loss, stats = model.loss(phase.name, x)
        assert loss.shape == () and torch.isfinite(loss)
        assert all(v.shape == () for v in stats.values())


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("likelihood, sigma", [("bernoulli", 0.1), ("gaussian", 0.1), ("gaussian", None),
                                               ("dlogistic", 0.1)])
def test_vae_shapes(size, channels, likelihood, sigma):
    model = build({"family": "vae", "z_dim": 6, "ch": 8, "likelihood": likelihood, "sigma": sigma}, channels, size)
    x = torch.rand(4, channels, size, size) * 2 - 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (4, 6)
    assert model.reconstruct(x).shape == x.shape
    assert model.sample(model.noise(3)).shape == (3, channels, size, size)
    loss, stats = model.loss("vae", x)
    assert torch.isfinite(loss) and set(stats) == {"vae/loss", "vae/recon", "vae/kl", "vae/nelbo"}


def test_unsupported_size_and_unknown_options_are_user_errors():
    with pytest.raises(GentrainError, match="dataset.image_size must be one of 16, 28, 32, 64, 128, 256, 512, got 48"):
        build({"family": "gan"}, 1, 48)
    with pytest.raises(GentrainError, match="model.family='flow'"):
        build({"family": "flow"}, 1, 28)
    with pytest.raises(GentrainError, match="model.loss='hinge2'"):
        build({"family": "gan", "loss": "hinge2"}, 1, 28)
    with pytest.raises(GentrainError, match="model.depth is not a setting of model=vae"):
        build({"family": "vae", "depth": 3}, 1, 28)


def test_gan_losses_match_hand_computed_values():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    sig = torch.sigmoid
    # -log D(x) - log(1 - D(G(z))), averaged over each batch
    expected_d = -(torch.log(sig(real))).mean() - torch.log(1 - sig(fake)).mean()
    assert torch.allclose(d_loss(real, fake), expected_d)
    assert torch.allclose(g_loss_ns(None, fake), -torch.log(sig(fake)).mean())
    assert torch.allclose(g_loss_minimax(None, fake), torch.log(1 - sig(fake)).mean())
    # by hand for logit 0: D = 1/2, -log D = log 2
    assert math.isclose(g_loss_ns(None, torch.zeros(3)).item(), math.log(2), rel_tol=1e-6)


def test_losses_stay_finite_where_sigmoid_saturates():
    big = torch.tensor([100.0, -100.0])
    assert torch.isfinite(d_loss(big, -big)) and torch.isfinite(g_loss_ns(None, -big))


def test_generator_phase_leaves_discriminator_gradients_alone_when_loop_freezes_it():
    model = build({"family": "gan", "z_dim": 4, "ch": 4}, 1, 28)
    model.requires_grad_(False)
    for p in model.phase_parameters("G"):
        p.requires_grad_(True)
    loss, _ = model.loss("G", torch.zeros(2, 1, 28, 28))
    loss.backward()
    assert all(p.grad is None for p in model.D.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.G.parameters())


def test_bernoulli_log_likelihood_matches_torch_distributions():
    logits, x = torch.randn(3, 1, 4, 4), torch.randint(0, 2, (3, 1, 4, 4)).float()
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(log_prob(logits, x, "bernoulli"), expected, atol=1e-5)


def test_gaussian_log_likelihood_matches_torch_distributions():
    mean, x = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    expected = torch.distributions.Normal(mean, 0.2).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(log_prob(mean, x, "gaussian", 0.2), expected, atol=1e-4)
    # sigma=None: the decoder's second half of channels is log sigma, per pixel
    log_s = torch.randn(3, 2, 4, 4) * 0.5 - 1
    expected = torch.distributions.Normal(mean, log_s.exp()).log_prob(x).flatten(1).sum(1)
    assert torch.allclose(log_prob(torch.cat([mean, log_s], 1), x, "gaussian", None), expected, atol=1e-4)


def logistic_cdf(mu, s):
    """torch.distributions' logistic: a uniform pushed through the logit and an affine map."""
    T = torch.distributions.transforms
    d = torch.distributions.TransformedDistribution(
        torch.distributions.Uniform(torch.zeros_like(mu), torch.ones_like(mu)),
        [T.SigmoidTransform().inv, T.AffineTransform(mu, s)])
    return d.cdf


def test_discretized_logistic_matches_torch_distributions_and_sums_to_one():
    torch.manual_seed(0)
    mu, log_s = (torch.rand(2, 3, 4, 4) * 2 - 1).double(), (torch.rand(2, 3, 4, 4) * 3 - 4).double()
    pixels = torch.randint(0, 256, (2, 3, 4, 4))
    pixels[0, 0, 0, :2] = torch.tensor([0, 255])  # the two edge bins take the mass beyond them
    x = pixels.double() * 2 / 255 - 1
    cdf = logistic_cdf(mu, log_s.exp())
    hi = torch.where(pixels == 255, torch.ones_like(x), cdf(x + 1 / 255))
    lo = torch.where(pixels == 0, torch.zeros_like(x), cdf(x - 1 / 255))
    expected = torch.log(hi - lo)
    got = discretized_logistic(torch.cat([mu, log_s], 1), pixels.double() / 255)
    likely = expected > math.log(1e-5)  # exact differences of the CDF
    assert likely.sum() > 20 and torch.allclose(got[likely], expected[likely], atol=1e-6)
    # Far in a tail, the density at the bin's centre times its width (where the reference's CDF difference
    # has not itself rounded to 0 even in float64)
    tail = ~likely & torch.isfinite(expected)
    assert tail.sum() > 5 and torch.allclose(got[tail], expected[tail], rtol=1e-3)
    assert torch.isfinite(got).all()
    # Over all 256 values of one sub-pixel the probabilities add up to 1: a true discrete likelihood.
    every = torch.arange(256).float().view(256, 1, 1, 1) / 255
    out = torch.tensor([0.3, -2.5]).view(1, 2, 1, 1).expand(256, 2, 1, 1)
    assert discretized_logistic(out, every).exp().sum().item() == pytest.approx(1.0, abs=1e-4)


def test_kl_closed_form_matches_monte_carlo():
    torch.manual_seed(0)
    mu, logvar = torch.randn(2, 5), torch.randn(2, 5) * 0.5
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(5), torch.ones(5))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(kl_std_normal(mu, logvar), mc, rtol=0.02, atol=0.02)
    assert torch.allclose(kl_std_normal(torch.zeros(1, 5), torch.zeros(1, 5)), torch.zeros(1))


def test_beta_weights_only_the_kl_term():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    losses = {}
    for beta in (0.0, 1.0, 4.0):
        torch.manual_seed(1)
        model = build({"family": "vae", "z_dim": 4, "ch": 4, "beta": beta}, 1, 28)
        torch.manual_seed(2)
        loss, stats = model.loss("vae", x)
        losses[beta] = (loss.item(), stats["vae/recon"].item(), stats["vae/kl"].item())
    for beta, (loss, recon, kl) in losses.items():
        assert math.isclose(loss, recon + beta * kl, rel_tol=1e-5)
    assert losses[0.0][1:] == losses[4.0][1:]  # same recon and KL: beta only reweights
