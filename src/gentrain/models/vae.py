"""The VAE family: an encoder q(z|x) and a decoder p(x|z) trained in one phase on the (beta-)ELBO."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentrain import GentrainError
from gentrain.dist import per_example
from gentrain.models.nets import Decoder, Encoder

LIKELIHOODS = ("bernoulli", "gaussian")


def log_likelihood(out: torch.Tensor, x01: torch.Tensor, likelihood: str, sigma: float) -> torch.Tensor:
    """log p(x|z) per image (nats), summed over pixels; x01 holds pixels in [0, 1].

    bernoulli: out are logits; log p = sum x log p + (1 - x) log(1 - p). On grey pixels this is the
               cross-entropy of the classic example, a training objective rather than a normalised
               density of continuous x.
    gaussian:  out is the mean; log N(x; mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - log sigma - log(2 pi) / 2.
    """
    if likelihood == "bernoulli":
        return -F.binary_cross_entropy_with_logits(out, x01, reduction="none").flatten(1).sum(1)
    logp = -0.5 * ((x01 - out) / sigma) ** 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return logp.flatten(1).sum(1)


def kl_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image, closed form (Kingma & Welling 2014, App. B):
    -1/2 * sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)


class VAE(nn.Module):
    phases = ("vae",)
    num_classes = 0  # unconditional

    def __init__(self, channels: int, image_size: int, z_dim: int = 16, ch: int = 64, beta: float = 1.0,
                 likelihood: str = "bernoulli", sigma: float = 0.1):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise GentrainError(f"model.likelihood={likelihood!r} is not supported; choose from {', '.join(LIKELIHOODS)}")
        if not beta >= 0 or not sigma > 0:
            raise GentrainError(f"model.beta must be >= 0 and model.sigma > 0, got beta={beta}, sigma={sigma}")
        self.z_dim, self.beta, self.likelihood, self.sigma = z_dim, beta, likelihood, sigma
        self.encoder = Encoder(channels, image_size, ch, 2 * z_dim, norm=False)
        self.decoder = Decoder(z_dim, channels, image_size, ch, norm=False)

    def phase_parameters(self, phase: str):
        return self.parameters()

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) = N(mu, diag(exp(logvar))) for images x in [-1, 1]."""
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z) as an image in [-1, 1]."""
        out = self.decoder(z).float()
        mean = torch.sigmoid(out) if self.likelihood == "bernoulli" else out.clamp(0, 1)
        return mean * 2 - 1

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, k: int, chunk: int = 100) -> torch.Tensor:
        """log importance weights, (N, k), of k samples z_i ~ q(z|x) per image (Burda et al. 2016, Eq. 8):
            log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x).
        Their mean is the ELBO; log (1/k) sum_i w_i is the IWAE bound L_k, which never falls below the
        ELBO and rises towards log p(x) as k grows (Burda et al. 2016, Theorem 1)."""
        mu, logvar = self.encode(x)
        std = (0.5 * logvar).exp()
        x01 = (x.float() + 1) / 2
        out = []
        for start in range(0, k, chunk):
            kc = min(chunk, k - start)
            eps = torch.randn(len(x), kc, self.z_dim, device=x.device)
            z = mu[:, None] + std[:, None] * eps
            log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_qz = (-0.5 * eps.pow(2) - 0.5 * math.log(2 * math.pi) - std.log()[:, None]).sum(-1)
            target = x01[:, None].expand(-1, kc, *x01.shape[1:]).flatten(0, 1)
            log_px = log_likelihood(self.decoder(z.flatten(0, 1)).float(), target, self.likelihood,
                                    self.sigma).view(len(x), kc)
            out.append(log_px + log_pz - log_qz)
        return torch.cat(out, 1)

    def loss(self, phase: str, x: torch.Tensor, y: torch.Tensor | None = None,
             step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # ELBO (Kingma & Welling 2014, Eq. 10) with the KL weighted by beta (Higgins et al. 2017, Eq. 4):
        #     L = E_q(z|x)[log p(x|z)] - beta * KL(q(z|x) || p(z)),   p(z) = N(0, I)
        # The expectation is estimated with one reparameterised sample z = mu + sigma * eps.
        mu, logvar = self.encode(x)
        z = mu + per_example(lambda m: torch.randn(m, self.z_dim, device=x.device), len(x)) * (0.5 * logvar).exp()
        recon = -log_likelihood(self.decoder(z).float(), (x.float() + 1) / 2, self.likelihood, self.sigma)
        kl = kl_std_normal(mu, logvar)
        loss = (recon + self.beta * kl).mean()
        # Reported per image in nats; nelbo is the beta=1 bound whatever beta trains with.
        return loss, {"vae/loss": loss.detach(), "vae/recon": recon.mean().detach(),
                      "vae/kl": kl.mean().detach(), "vae/nelbo": (recon + kl).mean().detach()}
