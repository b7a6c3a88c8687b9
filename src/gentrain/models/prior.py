"""A Gaussian mixture as a VAE's sampling prior, fitted after training to the posterior means of the
training images: ex-post density estimation (Ghosh et al. 2020, "From Variational to Deterministic
Autoencoders", Sec. 4, with 10 full-covariance components).

A VAE trained on the ELBO leaves its aggregate posterior q(z) = E_x q(z|x) unlike N(0, I): codes drawn
from N(0, I) land in regions no training image encodes to, and decode to blur or to blends of classes
("holes", Rezende & Viola 2018). Drawing from a density fitted to where the training images do encode
leaves the model and its likelihood as they are and changes only where samples come from.
"""

import math

import torch

KINDS = ("gaussian", "gmm")


class GaussianMixture:
    """p(z) = sum_k pi_k N(z; mu_k, Sigma_k) over flat codes, kept as (weights, means, scale_tril) in
    float64 on the CPU."""

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor):
        self.weights, self.means, self.scale_tril = weights, means, scale_tril

    @classmethod
    def fit(cls, z: torch.Tensor, components: int = 10, iters: int = 100, tol: float = 1e-4, seed: int = 0,
            reg: float = 1e-6) -> tuple["GaussianMixture", float]:
        """Maximum likelihood by expectation-maximisation (Dempster et al. 1977; Bishop 2006, Sec. 9.2.2),
        from `components` codes of z (n, d) picked by k-means++ seeding as the first means and z's
        covariance for each component; `reg` is added to every covariance's diagonal, as scikit-learn's reg_covar, so none
        collapses onto a point. Stops when the mean log-likelihood gains less than `tol` nats. Returns the
        mixture and the training codes' mean log-likelihood under it."""
        z = z.double().flatten(1)
        n, d = z.shape
        k = min(components, n)
        means = kmeans_pp(z, k, torch.Generator().manual_seed(seed))
        eye = torch.eye(d, dtype=z.dtype)
        cov = (torch.cov(z.T).reshape(d, d) + reg * eye).expand(k, d, d).clone()
        weights = torch.full((k,), 1.0 / k, dtype=z.dtype)
        before = -math.inf
        for _ in range(iters):
            # E step: responsibilities r_nk = pi_k N(z_n; mu_k, Sigma_k) / p(z_n)
            joint = log_normal(z, means, torch.linalg.cholesky(cov)) + weights.log()
            log_p = torch.logsumexp(joint, dim=1)
            r = (joint - log_p[:, None]).exp()
            # M step: each component's share, mean and covariance under its responsibilities
            nk = r.sum(0).clamp(min=1e-12)
            weights, means = nk / n, (r.T @ z) / nk[:, None]
            cov = torch.stack([((z - means[j]).T * r[:, j]) @ (z - means[j]) / nk[j] for j in range(k)]) + reg * eye
            now = log_p.mean().item()
            if now - before < tol:
                break
            before = now
        mixture = cls(weights, means, torch.linalg.cholesky(cov))
        return mixture, mixture.log_prob(z).mean().item()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) of flat codes z (n, d), nats."""
        return torch.logsumexp(log_normal(z.double(), self.means, self.scale_tril) + self.weights.log(), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n flat codes (float32), a component drawn by its weight and then its Gaussian, from `generator`
        (the same seed gives the same codes)."""
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        z = self.means[which] + (self.scale_tril[which] @ eps[:, :, None]).squeeze(-1)
        return z.float()

    def state_dict(self) -> dict:
        return {"kind": "gmm", "weights": self.weights, "means": self.means, "scale_tril": self.scale_tril}

    @classmethod
    def from_state(cls, state: dict) -> "GaussianMixture":
        return cls(state["weights"].double(), state["means"].double(), state["scale_tril"].double())

    def describe(self) -> str:
        return f"a {len(self.weights)}-component Gaussian mixture over {self.means.shape[1]} dimensions"


def log_normal(z: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """log N(z_n; mu_k, L_k L_k^T) for every code n and component k, (n, k): torch.distributions'
    MultivariateNormal.log_prob, one triangular solve per component rather than one per (code, component)
    pair: -1/2 (d log 2 pi + ||L_k^-1 (z_n - mu_k)||^2) - sum log diag L_k."""
    d = z.shape[1]
    out = []
    for mu, tril in zip(means, scale_tril):
        y = torch.linalg.solve_triangular(tril, (z - mu).T, upper=False)
        out.append(-0.5 * (d * math.log(2 * math.pi) + y.pow(2).sum(0)) - tril.diagonal().log().sum())
    return torch.stack(out, dim=1)


def kmeans_pp(z: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k of the points z (n, d), spread out by k-means++ seeding (Arthur & Vassilvitskii 2007): the first
    at random, each next one with probability proportional to its squared distance to the nearest so far.
    EM from random points can leave two components in one cluster and one across two."""
    picked = [z[torch.randint(len(z), (1,), generator=generator)].squeeze(0)]
    nearest = (z - picked[0]).pow(2).sum(1)
    for _ in range(k - 1):
        picked.append(z[torch.multinomial(nearest.clamp(min=1e-300), 1, generator=generator)].squeeze(0))
        nearest = torch.minimum(nearest, (z - picked[-1]).pow(2).sum(1))
    return torch.stack(picked)
