"""The VQ-VAE family (van den Oord et al. 2017): an encoder to a grid of vectors z_e, each replaced by its
nearest of K codes, and a decoder, trained in phase "vqvae"; and a PixelCNN prior over the code grid
(pixelcnn.py), trained in phase "prior" on the codes of the same batch, which `sample` draws from."""

import math

import torch
from torch import nn

from gentrain import dist
from gentrain.checks import integer
from gentrain.data import DataFacts
from gentrain.errors import GentrainError
from gentrain.models import likelihoods
from gentrain.models.family import BITSTREAM, CODEC, INTERPOLATE, LIKELIHOOD, RECONSTRUCT, Phase
from gentrain.models.likelihoods import LIKELIHOODS
from gentrain.models.nets import plan
from gentrain.models.pixelcnn import PixelCNN
from gentrain.models.resnet import ResDecoder, ResEncoder

CODEBOOKS = ("ema", "loss")
DOWN = 2  # two halvings: a 28 px image becomes 7x7 codes, 32 px 8x8 and 64 px 16x16 (the paper's factor 4)
EPS = 1e-5  # Laplace smoothing of the EMA cluster sizes


def nearest(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The index of the nearest code to each row of z (M, D), by ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2,
    in fp32 whatever autocast is on (near ties must not flip with the precision)."""
    with torch.autocast(z.device.type, enabled=False):
        z, e = z.float(), codebook.float()
        return (z.pow(2).sum(1, keepdim=True) - 2 * z @ e.t() + e.pow(2).sum(1)).argmin(1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_e + sg(z_q - z_e): z_q on the way forward, while the decoder's gradient at z_q is copied to z_e
    unchanged on the way back (van den Oord et al. 2017, Sec. 3.1, the straight-through estimator)."""
    return z_e + (z_q - z_e).detach()


def code_counts(idx: torch.Tensor, k: int) -> torch.Tensor:
    """How often each of k codes is used in idx, as floats. (torch.bincount on CUDA reads the largest index
    back to the host to size its output: a sync on every step.)"""
    flat = idx.flatten()
    return torch.zeros(k, device=idx.device).index_add_(0, flat, torch.ones(len(flat), device=idx.device))


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the code usage: K when all K codes are used equally, 1 when one code is."""
    p = counts / counts.sum()
    return torch.exp(-torch.special.xlogy(p, p).sum())


@torch.no_grad()
def ema_update(codebook: torch.Tensor, count: torch.Tensor, total: torch.Tensor, z: torch.Tensor,
               idx: torch.Tensor, decay: float) -> torch.Tensor:
    """The EMA codebook update (van den Oord et al. 2017, App. A.1, Eqs. 6-8), in place: with n_i the
    number of vectors z_j assigned to code i in this batch,
        N_i <- gamma N_i + (1 - gamma) n_i,   m_i <- gamma m_i + (1 - gamma) sum_j z_j,   e_i = m_i / N_i,
    where N_i is Laplace-smoothed, (N_i + eps) / (n + K eps) * n with n = sum_i N_i, so no code divides by 0.
    The batch's counts and sums are summed over data-parallel ranks first, so every rank takes the update
    one process would on the global batch. Returns those (global) counts n_i."""
    k = len(codebook)
    ones_and_z = torch.cat([torch.ones(len(z), 1, device=z.device), z.float()], 1)
    batch = dist.total(torch.zeros(k, 1 + z.shape[1], device=z.device).index_add_(0, idx, ones_and_z))
    count.mul_(decay).add_(batch[:, 0], alpha=1 - decay)
    total.mul_(decay).add_(batch[:, 1:], alpha=1 - decay)
    n = count.sum()
    codebook.copy_(total / ((count + EPS) / (n + k * EPS) * n)[:, None])
    return batch[:, 0]


@torch.no_grad()
def restart_dead(codebook: torch.Tensor, count: torch.Tensor, total: torch.Tensor, z: torch.Tensor,
                 threshold: float) -> torch.Tensor:
    """Random restarts (Dhariwal et al. 2020, Jukebox, "random restarts for embeddings"): every code whose
    EMA count N_i has fallen below `threshold` becomes a vector z_j drawn at random from the global batch,
    with N_i = 1, so codes the encoder's outputs never reach are moved to where they are (without them,
    a short MNIST run used a fifth of its 128 codes). z holds this rank's rows;
    every rank draws the same positions in the global batch (the ranks share their RNG) and the rank
    that holds a position supplies its vector, so N ranks restart exactly as one process does.
    Returns the mask of restarted codes."""
    dead = count < threshold
    k, m = codebook.shape[0], len(z)
    pick = torch.randint(m * dist.world_size(), (k,), device=z.device) - dist.rank() * m
    mine = (pick >= 0) & (pick < m)
    # Masks as torch.where rather than boolean indexing, which would read the mask's size back to the host.
    chosen = dist.total(torch.where(mine[:, None], z[pick.clamp(0, m - 1)].to(codebook.dtype), 0.0))
    codebook.copy_(torch.where(dead[:, None], chosen, codebook))
    total.copy_(torch.where(dead[:, None], chosen, total))
    count.copy_(torch.where(dead, 1.0, count))
    return dead


class VQVAE(nn.Module):
    optimizers = ("vqvae", "prior")
    phases = (Phase("vqvae", "vqvae"), Phase("prior", "prior"))
    capabilities = frozenset({RECONSTRUCT, INTERPOLATE, LIKELIHOOD, CODEC, BITSTREAM})
    num_classes = 0

    def __init__(self, channels: int, image_size: int, num_codes: int = 128, z_dim: int = 16, ch: int = 64,
                 beta: float = 0.25, codebook: str = "ema", decay: float = 0.99, restart: float = 1.0,
                 likelihood: str = "bernoulli", sigma: float | None = 0.1, prior_ch: int = 64, prior_layers: int = 6):
        super().__init__()
        self.num_codes, self.z_dim, self.beta, self.decay, self.restart = num_codes, z_dim, beta, decay, restart
        self.likelihood, self.sigma, self.ema = likelihood, sigma, codebook == "ema"
        self.side = image_size // 2 ** DOWN
        # The paper's stacks: two halvings, then residual blocks (ReLU, 3x3, ReLU, 1x1 there; SNGAN-style
        # 3x3 blocks here) at the code grid's side, and the mirror image back up; no batch norm.
        self.encoder = ResEncoder(channels, ch, z_dim, DOWN, extra=2)
        self.decoder = ResDecoder(z_dim, ch, likelihoods.out_channels(likelihood, channels, sigma), DOWN, extra=2)
        # Small codes near the origin to start; the restarts move the ones no vector picks onto the
        # encoder's outputs.
        codes = torch.empty(num_codes, z_dim).uniform_(-1 / num_codes, 1 / num_codes)
        if self.ema:  # the codebook follows the encoder's outputs (EMA buffers), not a gradient
            self.register_buffer("codebook", codes)
            # Starting from N_i = 1 and m_i = e_i keeps e_i = m_i / N_i where it was for a code no batch
            # picks yet, instead of dividing by a count of ~0.
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        self.prior = PixelCNN(num_codes, prior_ch, prior_layers)

    @classmethod
    def check(cls, s, facts: DataFacts) -> None:
        """The VQ-VAE settings as one clear line each when wrong."""
        if facts.points:
            raise GentrainError("model=vqvae models images, and this dataset holds 2-D points: train those with "
                                "model=gan (experiment=toy)")
        plan(facts.image_size)  # a supported size, or one clear line
        if s["codebook"] not in CODEBOOKS:
            raise GentrainError(f"model.codebook={s['codebook']!r} is unknown; choose from {', '.join(CODEBOOKS)}")
        if s["likelihood"] not in LIKELIHOODS:
            raise GentrainError(f"model.likelihood={s['likelihood']!r} is not supported; "
                                f"choose from {', '.join(LIKELIHOODS)}")
        integer(2)("model.num_codes", s["num_codes"])
        for key in ("z_dim", "ch", "prior_ch", "prior_layers"):
            integer(1)(f"model.{key}", s[key])
        beta, decay, restart, sigma = s["beta"], s["decay"], s["restart"], s["sigma"]
        if not beta >= 0 or not 0 < decay < 1 or not restart >= 0 or (sigma is not None and not sigma > 0):
            raise GentrainError(f"need model.beta >= 0, 0 < model.decay < 1, model.restart >= 0 and model.sigma > 0 "
                                f"(or null: learned); got beta={beta}, decay={decay}, restart={restart}, sigma={sigma}")

    def phase_parameters(self, opt: str):
        if opt == "prior":
            return self.prior.parameters()
        return [*self.encoder.parameters(), *self.decoder.parameters(), *([] if self.ema else [self.codebook])]

    def after_step(self, phase: str, step) -> None:
        pass

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """The randomness of n samples: one uniform per code cell, which ancestral sampling inverts."""
        return torch.rand(n, self.side, self.side, generator=generator, device=device)

    def observe(self, x: torch.Tensor) -> torch.Tensor:
        """The pixels the model is scored on (eval's contract with the VAE): the images as they are."""
        return x

    def quantize(self, z_e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each vector of z_e (N, D, H, W) replaced by its nearest code: the indices (N, H, W) and z_q."""
        n, d, h, w = z_e.shape
        idx = nearest(z_e.permute(0, 2, 3, 1).reshape(-1, d), self.codebook)
        return idx.view(n, h, w), self.lookup(idx.view(n, h, w))

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Code indices (N, H, W) -> their codes as a grid of vectors (N, D, H, W)."""
        return self.codebook[idx].permute(0, 3, 1, 2)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The code indices (N, H, W) of images x in [-1, 1]."""
        return self.quantize(self.encoder(x).float())[0]

    def log_px(self, z_q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z_q) per image, nats."""
        return likelihoods.log_prob(self.decoder(z_q).float(), (x.float() + 1) / 2, self.likelihood, self.sigma)

    def decode(self, idx: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of p(x|z_q) for code indices (N, H, W), as images in [-1, 1]."""
        out = self.decoder(self.lookup(idx)).float()
        return likelihoods.mean(out, self.likelihood, self.sigma) * 2 - 1

    def sample(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images for the uniforms z of noise(): codes drawn from the PixelCNN prior, then decoded."""
        return self.decode(self.prior.sample(z))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(self.codes(x))

    def interpolate(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Images along the straight line from z_e(a) to z_e(b), before quantisation, each point quantised
        and decoded: (rows of a and b, steps t) -> rows x steps images. Discrete codes have no path between
        them, but the encoder's outputs do; the images change where a cell's nearest code changes."""
        za, zb = self.encoder(a).float(), self.encoder(b).float()
        z = za[:, None] + t.view(1, -1, 1, 1, 1) * (zb - za)[:, None]
        return self.decode(self.quantize(z.flatten(0, 1))[0])

    # As a codec: an image's code is its grid of code indices, priced under the PixelCNN prior.

    @property
    def code_shape(self) -> list[int]:
        return [self.side, self.side]

    def encode_codes(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.codes(x)
        return idx.to(index_dtype(self.num_codes)), self.prior.nll(idx)

    def decode_codes(self, codes: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(codes.long())

    def code_logits(self, codes: torch.Tensor) -> torch.Tensor:
        return self.prior(codes)

    def describe_codes(self, dtype: torch.dtype, rate_bits: float, stored_bits: int) -> str:
        side, k = self.side, self.num_codes
        return (f"codes: {side}x{side} indices into {k} codes, stored as {str(dtype).split('.')[-1]}\n"
                f"bits per image: {side * side * math.log2(k):.0f} at a fixed length ({side * side} cells x log2({k}) = "
                f"{math.log2(k):.3g} bits); {rate_bits:.1f} entropy-coded with the PixelCNN prior (its -log2 p(codes), "
                f"about the length an arithmetic coder reaches); {stored_bits} as stored")

    def protocol(self) -> dict:
        return likelihoods.protocol(self.likelihood, False)

    @torch.no_grad()
    def rate_distortion(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image, in nats: the rate -log p(codes) under the PixelCNN prior, what the codes cost when
        entropy-coded with it, and the distortion -log p(x|z_q)."""
        idx, z_q = self.quantize(self.encoder(x).float())
        return self.prior.nll(idx), -self.log_px(z_q, x)

    def loss(self, phase: str, x: torch.Tensor, y: torch.Tensor | None = None, step: int = 0,
             carry: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if phase == "prior":
            # The prior learns the codes the current encoder gives this batch; they are data here, so no
            # gradient reaches the encoder or the codebook.
            with torch.no_grad():
                idx = self.codes(x)
            nll = self.prior.nll(idx)
            return nll.mean(), {"prior/nll": nll.mean().detach()}
        z_e = self.encoder(x).float()
        idx, z_q = self.quantize(z_e)
        counts = code_counts(idx, self.num_codes)
        if self.training:  # usage over the global batch; the EMA codebook moves towards its vectors
            if self.ema:
                flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, self.z_dim)
                counts = ema_update(self.codebook, self.ema_count, self.ema_sum, flat, idx.flatten(), self.decay)
                if self.restart:
                    restart_dead(self.codebook, self.ema_count, self.ema_sum, flat, self.restart)
            else:
                counts = dist.total(counts)
        # The VQ-VAE objective (van den Oord et al. 2017, Eq. 3), per image, summed over the code grid:
        #     L = -log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2 + beta ||z_e(x) - sg[e]||^2
        # The decoder reads z_q through the straight-through estimator; the codebook term is replaced by
        # the EMA update with model.codebook=ema (App. A.1).
        recon = -self.log_px(straight_through(z_e, z_q), x)
        commit = (z_e - z_q.detach()).pow(2).flatten(1).sum(1)
        loss = recon.mean() + self.beta * commit.mean()
        stats = {"vqvae/recon": recon.mean().detach(), "vqvae/commit": commit.mean().detach()}
        if not self.ema:
            codebook = (z_e.detach() - z_q).pow(2).flatten(1).sum(1)
            loss = loss + codebook.mean()
            stats["vqvae/codebook"] = codebook.mean().detach()
        return loss, {"vqvae/loss": loss.detach(), **stats, "vqvae/perplexity": perplexity(counts),
                      "vqvae/usage": (counts > 0).float().mean()}



def index_dtype(num_codes: int) -> torch.dtype:
    """The smallest integer type that holds the indices 0..num_codes-1."""
    return torch.uint8 if num_codes <= 256 else torch.int16 if num_codes <= 2 ** 15 else torch.int32
