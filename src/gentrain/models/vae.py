"""The VAE family: an encoder q(z|x) and a decoder p(x|z) trained in one phase on the (beta-)ELBO or
the IWAE bound; the likelihoods p(x|z) are in likelihoods.py, the networks in nets.py (conv) and
resnet.py (resnet)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.checks import integer
from gentrain.data import DataFacts
from gentrain.dist import per_example
from gentrain.errors import GentrainError
from gentrain.models import likelihoods
from gentrain.models.family import CODEC, IWAE, LATENT_PRIOR, LIKELIHOOD, RECONSTRUCT, Phase
from gentrain.models.likelihoods import LIKELIHOODS
from gentrain.models.nets import Decoder, Encoder, plan
from gentrain.models.resnet import ResDecoder, ResEncoder

LOG_2PI = math.log(2 * math.pi)
ARCHS = ("conv", "resnet")
GRID_ABOVE, GRID_DOWN = 64, 4  # arch=resnet above 64 px: a latent grid at 1/2^4 of the image side


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) of each latent dimension, closed form (Kingma & Welling 2014,
    App. B): -1/2 (1 + log sigma^2 - mu^2 - sigma^2)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_std_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per image: the sum over latent dimensions."""
    return kl_per_dim(mu, logvar).flatten(1).sum(1)


class VAE(nn.Module):
    optimizers = ("vae",)
    phases = (Phase("vae", "vae"),)
    capabilities = frozenset({RECONSTRUCT, LIKELIHOOD, IWAE, CODEC, LATENT_PRIOR})
    num_codes = 0  # its codes are real vectors
    latent_prior = None  # samples' codes from N(0, I); a fitted GaussianMixture while set (gentrain sample prior=gmm)

    def __init__(self, channels: int, image_size: int, z_dim: int = 16, ch: int = 64, beta: float = 1.0,
                 likelihood: str = "bernoulli", sigma: float | None = 0.1, binarize: bool = False,
                 kl_warmup_steps: int = 0, free_bits: float = 0.0, k: int = 1, conditional: bool = False,
                 num_classes: int = 0, arch: str = "conv"):
        super().__init__()
        self.z_dim, self.beta, self.likelihood, self.sigma = z_dim, beta, likelihood, sigma
        self.binarize, self.kl_warmup_steps, self.free_bits, self.k = binarize, kl_warmup_steps, free_bits, k
        self.num_classes = num_classes if conditional else 0
        # The conditional VAE (Sohn et al. 2015) reads the class in both networks: q(z|x, y) as one-hot
        # planes beside the image, p(x|z, y) as an embedding beside z; the prior stays N(0, I).
        out = likelihoods.out_channels(likelihood, channels, sigma)
        if arch == "conv":  # the DCGAN stacks without batch norm; checkpoints from before `arch` are these
            self.encoder = Encoder(channels + self.num_classes, image_size, ch, 2 * z_dim, norm=False)
            self.decoder = Decoder(z_dim, out, image_size, ch, norm=False, num_classes=self.num_classes)
        elif image_size <= GRID_ABOVE:  # residual blocks at every resolution, width ch throughout, no norm
            base, n = plan(image_size)
            self.encoder = nn.Sequential(ResEncoder(channels + self.num_classes, ch, 2 * z_dim, n, head=base),
                                         nn.Flatten())
            self.decoder = ResDecoder(z_dim, ch, out, n, stem=base, num_classes=self.num_classes)
        else:
            # Above 64 px one vector cannot hold an image: the latent is a grid of z_dim-vectors at 1/16 of the
            # image side (8x8 at 128 px, 16x16 at 256), each with its own N(0, I) prior, as in the VQ-VAE and
            # the latent grids of hierarchical VAEs (Vahdat & Kautz 2020, NVAE).
            self.encoder = ResEncoder(channels + self.num_classes, ch, 2 * z_dim, GRID_DOWN, head=1)
            self.decoder = ResDecoder(z_dim, ch, out, GRID_DOWN, num_classes=self.num_classes)
        side = image_size // 2 ** GRID_DOWN
        self.latent_shape = (z_dim,) if arch == "conv" or image_size <= GRID_ABOVE else (z_dim, side, side)

    @classmethod
    def check(cls, s, facts: DataFacts) -> None:
        """The VAE settings as one clear line each when wrong."""
        if facts.points:
            raise GentrainError("model=vae models images, and this dataset holds 2-D points: train those with "
                                "model=gan (experiment=toy)")
        plan(facts.image_size)
        if s["arch"] not in ARCHS:
            raise GentrainError(f"model.arch={s['arch']!r} is unknown for model=vae; choose from {', '.join(ARCHS)}")
        integer(1)("model.z_dim", s["z_dim"])
        integer(1)("model.ch", s["ch"])
        likelihood, beta, sigma, free_bits, k = s["likelihood"], s["beta"], s["sigma"], s["free_bits"], s["k"]
        if likelihood not in LIKELIHOODS:
            raise GentrainError(f"model.likelihood={likelihood!r} is not supported; choose from {', '.join(LIKELIHOODS)}")
        if not beta >= 0 or (sigma is not None and not sigma > 0) or not free_bits >= 0:
            raise GentrainError(f"need model.beta >= 0, model.sigma > 0 (or null: learned) and model.free_bits >= 0; "
                                f"got beta={beta}, sigma={sigma}, free_bits={free_bits}")
        if s["binarize"] and likelihood != "bernoulli":
            raise GentrainError(f"model.binarize=true makes {{0, 1}} pixels, which only model.likelihood=bernoulli "
                                f"describes; got likelihood={likelihood}")
        integer(1)("model.k", k)
        integer(0)("model.kl_warmup_steps", s["kl_warmup_steps"])
        if k > 1 and (beta != 1 or free_bits or s["kl_warmup_steps"]):
            raise GentrainError(f"model.k={k} trains the IWAE bound, which has no KL term to weigh: it takes "
                                f"model.beta=1, free_bits=0 and kl_warmup_steps=0")
        if s["conditional"] and not facts.num_classes:
            raise GentrainError("model.conditional=true needs a labelled dataset (one with classes); this one has none")

    def phase_parameters(self, opt: str):
        return self.parameters()

    def after_step(self, phase: str, step) -> None:
        pass

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Codes for samples: from the prior N(0, I), or from the fitted sampling prior while one is set."""
        if self.latent_prior is not None:
            return self.latent_prior.sample(n, generator).reshape(n, *self.latent_shape).to(device)
        return torch.randn(n, *self.latent_shape, generator=generator, device=device)

    def eps(self, n: int, device=None) -> torch.Tensor:
        """The reparameterisation's standard normal draws, eps ~ N(0, I), of n codes."""
        return torch.randn(n, *self.latent_shape, device=device)

    def posterior_means(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.encode(x, y)[0].flatten(1)

    def _cond(self, y):
        return (y,) if self.num_classes else ()

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels the model is trained and scored on, in [-1, 1]. With model.binarize, dynamic
        binarisation (Salakhutdinov & Murray 2008): every time an image is read, each pixel is drawn
        from a Bernoulli of its intensity, so the model sees {0, 1} images and a fresh draw each epoch."""
        if not self.binarize:
            return x
        u = per_example(lambda m: torch.rand(m, *x.shape[1:], device=x.device), len(x))
        return (u < (x.float() + 1) / 2).float() * 2 - 1

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) = N(mu, diag(exp(logvar))) for images x in [-1, 1] (and their classes y)."""
        if self.num_classes:
            planes = F.one_hot(y, self.num_classes)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes.to(x.dtype)], 1)
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def log_px(self, z: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x|z) per image, nats, for images x in [-1, 1]."""
        return likelihoods.log_prob(self.decoder(z, *self._cond(y)).float(), (x.float() + 1) / 2,
                                    self.likelihood, self.sigma)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of p(x|z) as an image in [-1, 1]."""
        out = self.decoder(z, *self._cond(y)).float()
        return likelihoods.mean(out, self.likelihood, self.sigma) * 2 - 1

    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images decoded from prior codes z; a conditional model without labels draws the classes in turn."""
        if self.num_classes and y is None:
            y = torch.arange(len(z), device=z.device) % self.num_classes
        return self.decode(z, y)

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.encode(x, y)[0], y)

    # As a codec: an image's code is its posterior mean, priced at the rate KL(q(z|x) || p(z)).

    @property
    def code_shape(self) -> list[int]:
        return list(self.latent_shape)

    def encode_codes(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x, y)
        return mu, kl_std_normal(mu, logvar)

    def decode_codes(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(codes.float(), y)

    def describe_codes(self, dtype: torch.dtype, rate_bits: float, stored_bits: int) -> str:
        return (f"codes: the posterior means of {math.prod(self.latent_shape)} latent dimensions, stored as "
                f"{str(dtype).split('.')[-1]}\n"
                f"bits per image: {rate_bits:.1f} rate, KL(q(z|x) || p(z)) (Alemi et al. 2018: what a code drawn "
                f"from q(z|x) costs with bits-back coding; the means stored here are raw floats); "
                f"{stored_bits} as stored")

    def _log_w(self, x, y, mu, std, eps):
        """log w = log p(x|z) + log p(z) - log q(z|x) at z = mu + std * eps, for eps of shape (N, k, *latent)."""
        n, k = eps.shape[:2]
        z = mu[:, None] + std[:, None] * eps
        log_pz = (-0.5 * z.pow(2) - 0.5 * LOG_2PI).flatten(2).sum(-1)
        log_qz = (-0.5 * eps.pow(2) - 0.5 * LOG_2PI - std.log()[:, None]).flatten(2).sum(-1)
        each = lambda t: None if t is None else t[:, None].expand(-1, k, *t.shape[1:]).flatten(0, 1)
        return self.log_px(z.flatten(0, 1), each(x), each(y)).view(n, k) + log_pz - log_qz

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, k: int, chunk: int = 100, y: torch.Tensor | None = None) -> torch.Tensor:
        """log importance weights, (N, k), of k samples z_i ~ q(z|x) per image (Burda et al. 2016, Eq. 8):
            log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x).
        Their mean is the ELBO; log (1/k) sum_i w_i is the IWAE bound L_k, which never falls below the
        ELBO and rises towards log p(x) as k grows (Burda et al. 2016, Theorem 1)."""
        mu, logvar = self.encode(x, y)
        std = (0.5 * logvar).exp()
        out = []
        for start in range(0, k, chunk):
            kc = min(chunk, k - start)
            eps = per_example(lambda m: torch.randn(m, kc, *self.latent_shape, device=x.device), len(x))
            out.append(self._log_w(x, y, mu, std, eps))
        return torch.cat(out, 1)

    def protocol(self) -> dict:
        return likelihoods.protocol(self.likelihood, self.binarize)

    @torch.no_grad()
    def rate_distortion(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, in nats: the rate KL(q(z|x) || p(z)), what the code costs to send, and the
        distortion -log p(x|z) at one z ~ q(z|x); -ELBO = distortion + rate (Alemi et al. 2018, Sec. 2)."""
        mu, logvar = self.encode(x, y)
        z = mu + per_example(lambda m: self.eps(m, device=x.device), len(x)) * (0.5 * logvar).exp()
        return kl_std_normal(mu, logvar), -self.log_px(z, x, y)

    def loss(self, phase: str, x: torch.Tensor, y: torch.Tensor | None = None, step: int = 0,
             carry: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = self.observe(x)
        mu, logvar = self.encode(x, y)
        std = (0.5 * logvar).exp()
        if self.k > 1:
            # The IWAE bound (Burda et al. 2016, Eq. 8), trained through its k reparameterised samples:
            #     L_k = E[log (1/k) sum_i p(x, z_i) / q(z_i|x)] >= ELBO
            eps = per_example(lambda m: torch.randn(m, self.k, *self.latent_shape, device=x.device), len(x))
            log_w = self._log_w(x, y, mu, std, eps)
            loss = -(log_w.logsumexp(1) - math.log(self.k)).mean()
            return loss, {"vae/loss": loss.detach(), "vae/nelbo": -log_w.mean().detach(),
                          "vae/kl": kl_std_normal(mu, logvar).mean().detach()}
        # ELBO (Kingma & Welling 2014, Eq. 10) with the KL weighted by beta (Higgins et al. 2017, Eq. 4):
        #     L = E_q(z|x)[log p(x|z)] - beta * KL(q(z|x) || p(z)),   p(z) = N(0, I)
        # estimated with one reparameterised sample z = mu + sigma * eps.
        z = mu + std * per_example(lambda m: self.eps(m, device=x.device), len(x))
        recon = -self.log_px(z, x, y)
        kl_dims = kl_per_dim(mu, logvar)
        kl = kl_dims.flatten(1).sum(1)
        beta = self.beta
        if self.kl_warmup_steps:
            # KL warm-up (Bowman et al. 2016; Sønderby et al. 2016, Sec. 2.3): beta grows linearly from 0 over
            # the first kl_warmup_steps steps, so the decoder learns to use z before the KL pulls q to the
            # prior. The step is a device tensor (a captured CUDA graph passes one; a number becomes a fill
            # on the device, not a copy from the host, which would wait for it), and so is beta.
            if not torch.is_tensor(step):
                step = torch.full((), step, dtype=torch.float32, device=x.device)
            beta = self.beta * (step / self.kl_warmup_steps).clamp(max=1.0)
        if self.free_bits:
            # Free bits (Kingma et al. 2016, IAF, App. C.8): each latent dimension's KL, averaged over the
            # batch, costs nothing below lambda nats, so dimensions are not switched off early:
            #     sum_j max(lambda, E_x[KL(q(z_j|x) || p(z_j))])
            kl_term = kl_dims.mean(0).clamp(min=self.free_bits).sum()
        else:
            kl_term = kl.mean()
        loss = recon.mean() + beta * kl_term
        # Reported per image in nats; nelbo is the beta=1 bound whatever beta trains with.
        stats = {"vae/loss": loss.detach(), "vae/recon": recon.mean().detach(), "vae/kl": kl.mean().detach(),
                 "vae/nelbo": (recon + kl).mean().detach()}
        if self.kl_warmup_steps:
            stats["vae/beta"] = beta.float()
        return loss, stats

