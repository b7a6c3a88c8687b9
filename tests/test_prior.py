"""A VAE's sampling prior: the Gaussian mixture's EM fit against a known mixture, and prior=gmm through
`gentrain sample` and `gentrain eval`, fitted once, kept in the checkpoint, and gone from checkpoints of
new weights."""

import json

import pytest
import torch
from torch.distributions import MultivariateNormal

from conftest import FAST, assert_one_line_error, run_cli
from gentrain.models.prior import GaussianMixture, log_normal


def test_log_normal_is_torchs_multivariate_normal():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    tril = torch.linalg.cholesky(a @ a.mT + torch.eye(4, dtype=torch.float64))
    z = torch.randn(50, 4, generator=g, dtype=torch.float64)
    assert torch.allclose(log_normal(z, means, tril), MultivariateNormal(means, scale_tril=tril).log_prob(z[:, None]))


def test_em_recovers_a_known_mixture_and_samples_it_by_seed():
    g = torch.Generator().manual_seed(0)
    centres, shares = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]]), (3000, 2000, 1000)
    z = torch.cat([torch.randn(m, 2, generator=g) * 0.5 + c for c, m in zip(centres, shares)])
    mixture, loglik = GaussianMixture.fit(z, components=3)
    order = mixture.means[:, 0].argsort()  # left, top, right
    assert torch.allclose(mixture.means[order].float(), centres[[0, 2, 1]], atol=0.05)
    assert torch.allclose(mixture.weights[order].float(), torch.tensor([0.5, 1 / 6, 1 / 3]), atol=0.01)
    assert torch.allclose(mixture.scale_tril[order].diagonal(dim1=1, dim2=2).float(), torch.full((3, 2), 0.5), atol=0.03)
    # each component's Gaussian alone: -log(0.5^2 * 2 pi) - 1 nats per point, less log 1 / weight
    assert loglik == pytest.approx(-(2 * torch.log(torch.tensor(0.5 * (2 * torch.pi) ** 0.5)) + 1).item()
                                   + sum(m / 6000 * torch.log(torch.tensor(m / 6000)).item() for m in shares), abs=0.02)
    same = GaussianMixture.from_state(mixture.state_dict())
    a, b = mixture.sample(1000, torch.Generator().manual_seed(1)), same.sample(1000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert (a[:, 1] > 2.5).float().mean().item() == pytest.approx(1 / 6, abs=0.04)


@pytest.fixture(scope="module")
def vae(tmp_path_factory, data_root):
    root = tmp_path_factory.mktemp("prior")
    run_cli(["model=vae", "trainer.steps=4", *FAST, f"hydra.run.dir={root / 'vae'}"], root, data_root)
    run_cli(["model=gan", "trainer.steps=2", *FAST, f"hydra.run.dir={root / 'gan'}"], root, data_root)
    return root


def test_a_fitted_prior_is_kept_in_the_checkpoint_and_drawn_from(gentrain, vae, tmp_path):
    ckpt = vae / "vae" / "checkpoints" / "last.pt"
    first = gentrain("sample", f"ckpt={vae / 'vae'}", "prior=gmm", "prior_components=3", "n=16",
                     f"out={tmp_path / 'gmm.png'}")
    assert "a 3-component Gaussian mixture over 16 dimensions fitted to the posterior means of 60,000 training " \
           "images" in first.stdout and "kept in" in first.stdout
    stored = torch.load(ckpt, weights_only=True)["sampling_priors"]["gmm"]
    assert stored["components"] == 3 and stored["means"].shape == (3, 16)
    again = gentrain("sample", f"ckpt={vae / 'vae'}", "prior=gmm", "prior_components=3", "n=16",
                     f"out={tmp_path / 'again.png'}")
    assert "(kept in" in again.stdout and "mean log-likelihood" not in again.stdout  # not fitted again
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "gmm.png").read_bytes()
    gentrain("sample", f"ckpt={vae / 'vae'}", "n=16", f"out={tmp_path / 'gaussian.png'}")
    assert (tmp_path / "gaussian.png").read_bytes() != (tmp_path / "gmm.png").read_bytes()

    gentrain("eval", f"ckpt={vae / 'vae'}", "prior=gmm", "prior_components=3", "n=200", "metrics=[classes]",
             f"out={tmp_path / 'eval.json'}", f"metrics.cache_dir={tmp_path / 'cache'}")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["prior"]["kind"] == "gmm" and result["prior"]["components"] == 3

    # New weights need a prior of their own: a resumed run's checkpoints carry none.
    gentrain(f"resume={vae / 'vae'}", "trainer.steps=6")
    assert "sampling_priors" not in torch.load(ckpt, weights_only=True)


def test_a_prior_needs_continuous_codes(gentrain, vae):
    assert_one_line_error(gentrain("sample", f"ckpt={vae / 'gan'}", "prior=gmm", check=False),
                          "prior=gmm is fitted to a VAE's continuous codes;", "is a gan (leave prior=gaussian)")
    assert_one_line_error(gentrain("sample", f"ckpt={vae / 'vae'}", "prior=flow", check=False),
                          "prior must be one of gaussian|gmm, got 'flow'")
