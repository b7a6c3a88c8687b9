"""The metric maths on constructed feature sets with known answers, and the VAE's likelihood bounds."""

import math

import numpy as np
import pytest
import torch

from gentrain.metrics import scores
from gentrain.models.vae import VAE


def test_fid_of_a_feature_set_against_itself_is_zero():
    f = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    assert abs(scores.fid(scores.statistics(f), scores.statistics(f))) < 1e-6


def test_fid_between_two_gaussians_matches_the_closed_form():
    # Commuting (diagonal) covariances: Tr(S1 + S2 - 2 (S1 S2)^1/2) = sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = scores.fid({"mu": mu1, "sigma": np.diag(a)}, {"mu": mu2, "sigma": np.diag(b)})
    assert got == pytest.approx(exact, rel=1e-9)  # 5 + 5 = 10
    # A full covariance against the identity: Tr(S + I - 2 S^1/2) = sum over eigenvalues (sqrt(l) - 1)^2.
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    lam = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    s = (q * lam) @ q.T
    got = scores.fid({"mu": np.zeros(4), "sigma": s.numpy()}, {"mu": np.zeros(4), "sigma": np.eye(4)})
    assert got == pytest.approx(float(((lam.sqrt() - 1) ** 2).sum()), rel=1e-9)
    # And from samples: the estimate approaches the closed form.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * torch.tensor(a).sqrt() + torch.tensor(mu1)
    y = torch.randn(200_000, 3, generator=g, dtype=torch.float64) * torch.tensor(b).sqrt() + torch.tensor(mu2)
    assert scores.fid(scores.statistics(x), scores.statistics(y)) == pytest.approx(exact, rel=0.02)


def two_clusters(n: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g) + 100.0


def test_precision_recall_identical_disjoint_and_half_covered():
    a, b = two_clusters()
    real = torch.cat([a, b])
    assert scores.precision_recall(real, real) == (1.0, 1.0)
    assert scores.precision_recall(a, b) == (0.0, 0.0)
    # Fakes that cover only cluster a: all of them are realistic, half of the reals are reached.
    assert scores.precision_recall(real, a) == (1.0, 0.5)


def test_kid_is_about_zero_for_one_distribution_and_large_for_two():
    a, b = two_clusters(1000)
    same, _ = scores.kid(a[:500], a[500:], subsets=20, subset_size=200, seed=0)
    apart, _ = scores.kid(a, b, subsets=20, subset_size=200, seed=0)
    assert abs(same) < 0.05 and apart > 100


def test_class_coverage_and_kl():
    real = scores.class_histogram(torch.arange(10).repeat(10), 10)
    assert scores.classes_covered(real) == 10 and scores.class_kl(real, real) == pytest.approx(0.0)
    collapsed = scores.class_histogram(torch.tensor([3] * 97 + [4] * 3), 10)
    assert scores.classes_covered(collapsed) == 2  # 3% is above a quarter share (2.5%)
    assert scores.class_kl(collapsed, real) == pytest.approx(0.97 * math.log(9.7) + 0.03 * math.log(0.3))
    assert scores.class_accuracy(torch.tensor([1, 2, 3, 3]), torch.tensor([1, 2, 3, 4])) == 0.75


@pytest.fixture(scope="module")
def vae_and_batch():
    torch.manual_seed(0)
    model = VAE(channels=1, image_size=28, z_dim=4, ch=8).eval()
    x = (torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)) > 0.7).float() * 2 - 1
    return model, x


def test_log_weights_match_torch_distributions(vae_and_batch):
    model, x = vae_and_batch
    torch.manual_seed(5)
    log_w = model.log_weights(x, k=1)[:, 0]
    torch.manual_seed(5)
    eps = torch.randn(len(x), 1, 4)[:, 0]
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    z = mu + q.scale * eps
    px = torch.distributions.Bernoulli(logits=model.decoder(z)).log_prob((x + 1) / 2).flatten(1).sum(1)
    pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(log_w, px + pz - q.log_prob(z).sum(1), atol=1e-3)


def test_iwae_bound_is_above_the_elbo_and_rises_with_k(vae_and_batch):
    model, x = vae_and_batch
    sharp = VAE(channels=1, image_size=28, z_dim=4, ch=8).eval()
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():  # make p(x|z) depend strongly on z, so that q(z|x) is far from the posterior
        sharp.decoder.net[0].weight.mul_(30)
    torch.manual_seed(0)
    log_w = sharp.log_weights(x, k=1000, chunk=128)
    elbo = log_w.mean()
    # E[L_k] estimated from the 1000 weights split into 1000/k independent groups of k.
    bounds = [(log_w.view(len(x), -1, k).logsumexp(2) - math.log(k)).mean() for k in (1, 10, 100, 1000)]
    assert bounds[0] == pytest.approx(elbo.item(), rel=1e-5)
    assert all(hi > lo for lo, hi in zip(bounds, bounds[1:])), bounds
    assert bounds[-1] - elbo > 1  # a real gap, not rounding
