"""GAN losses and discriminator regularisers, as data: small functions on D's scores, each with its paper,
and the tables that name them.

A loss is a pair of functions of D's raw outputs on real and fake images, d(real, fake) for D and
g(real, fake) for G; `model.loss=` picks a row of LOSSES. A loss whose G term reads D's real scores (the
relativistic ones) says so, and G's phase then scores a real batch too; the others get real=None.
A regulariser is a penalty added to D's loss (R1, R2, the gradient penalty), which takes D and the images
because it differentiates D's output with respect to its input, or a constraint on D's weights applied
after D's optimizer step (weight clipping); `Regulariser` gives each its weight and interval.
"""

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from gentrain.dist import per_example

# Goodfellow et al. 2014, Eq. 1:
#     min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]
# D outputs a logit l, D = sigmoid(l), so  -log D = softplus(-l)  and  -log(1 - D) = softplus(l);
# softplus keeps both terms finite where sigmoid saturates.


def d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """D ascends V: minimise  -log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def g_loss_ns(real, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss (Goodfellow et al. 2014, Sec. 3): maximise log D(G(z)), which gives
    strong gradients early on, when D rejects every sample and log(1 - D(G(z))) is flat."""
    return F.softplus(-fake).mean()


def g_loss_minimax(real, fake: torch.Tensor) -> torch.Tensor:
    """The saturating G loss of Eq. 1 itself: minimise log(1 - D(G(z)))."""
    return -F.softplus(fake).mean()


# Wasserstein GAN (Arjovsky et al. 2017, Eq. 3): the critic D estimates the Earth-Mover distance
#     W(P_r, P_g) = max_{||D||_L <= 1}  E_x[D(x)] - E_z[D(G(z))],
# and G minimises it. The Lipschitz bound comes from weight clipping (wgan) or a gradient penalty (wgan_gp).


def d_loss_wgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return fake.mean() - real.mean()


def g_loss_wgan(real, fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]; also hinge's G loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 17)."""
    return -fake.mean()


def d_loss_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 16): E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


# Least-squares GAN (Mao et al. 2017, Eq. 2) with the 0-1 coding a = 0 (fake), b = c = 1 (real):
#     D: 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2]        G: 1/2 E[(D(G(z)) - 1)^2]


def d_loss_lsgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (real - 1).pow(2).mean() + 0.5 * fake.pow(2).mean()


def g_loss_lsgan(real, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fake - 1).pow(2).mean()


# The relativistic average GAN (Jolicoeur-Martineau 2019, Eqs. 12-13, RaSGAN): D judges whether a real
# image is more realistic than the average fake, and the reverse, from the logits C:
#     D: -E_x[log sigmoid(C(x) - E_z C(G(z)))] - E_z[log(1 - sigmoid(C(G(z)) - E_x C(x)))]
#     G: the same with real and fake swapped,
# so G's loss reads D's scores of real images too.


def d_loss_ragan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-(real - fake.mean())).mean() + F.softplus(fake - real.mean()).mean()


def g_loss_ragan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return d_loss_ragan(fake, real)


# The relativistic pairing GAN (RpGAN; Jolicoeur-Martineau 2019, Eq. 8 with f(t) = softplus(-t) = -log sigmoid(t);
# Huang et al. 2024, R3GAN, Eq. 2): D compares each real image with one fake, pair by pair,
#     D: E_{x, z}[f(D(x) - D(G(z)))]        G: E_{x, z}[f(D(G(z)) - D(x))],
# where f(t) = softplus(-t). Unlike the average (ragan), every pair's margin counts: R3GAN (Sec. 2.1-2.2)
# shows it has no mode-dropping maxima and, with R1 and R2 (below), local convergence. Real and fake
# batches are paired in order; both come shuffled.


def d_loss_rpgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(fake - real).mean()


def g_loss_rpgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(real - fake).mean()


@dataclass(frozen=True)
class Loss:
    d: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]          # D's loss (real, fake)
    g: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]   # G's loss (real or None, fake)
    logits: bool = False        # D's output is a logit of P(real): log its mean probabilities
    g_reads_real: bool = False  # G's loss needs D's scores of real images


LOSSES = {
    "ns": Loss(d_loss, g_loss_ns, logits=True),
    "minimax": Loss(d_loss, g_loss_minimax, logits=True),
    "wgan": Loss(d_loss_wgan, g_loss_wgan),
    "wgan_gp": Loss(d_loss_wgan, g_loss_wgan),
    "hinge": Loss(d_loss_hinge, g_loss_wgan),
    "lsgan": Loss(d_loss_lsgan, g_loss_lsgan),
    "ragan": Loss(d_loss_ragan, g_loss_ragan, g_reads_real=True),
    "rpgan": Loss(d_loss_rpgan, g_loss_rpgan, g_reads_real=True),
}


# Regularisers of D.


def _input_grad_norm2(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """||grad_x D(x)||^2 per example, kept in the graph so the penalty itself can be trained on."""
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.flatten(1).pow(2).sum(1)


def _zero_centred(D, images: torch.Tensor, *args) -> torch.Tensor:
    """E[||grad_x D(x)||^2] at the given images, detached from whatever made them: R1's and R2's term."""
    x = images.detach().requires_grad_(True)
    return _input_grad_norm2(D(x, *args).float(), x).mean()


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, *args) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017, Eq. 3): E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = e x + (1 - e) G(z),
    e ~ U[0, 1] per example; the caller weighs it by lambda. `args` (class labels) go on to D."""
    e = per_example(lambda m: torch.rand(m, *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype), len(real))
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    return (_input_grad_norm2(D(x_hat, *args).float(), x_hat).sqrt() - 1).pow(2).mean()


def r1_penalty(D, real: torch.Tensor, fake: torch.Tensor | None = None, *args) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, Eq. 9): E_x[||grad_x D(x)||^2] on real data only; the caller weighs it
    by gamma / 2. It pulls D's gradient to zero on the data manifold, where an equilibrium can hold."""
    return _zero_centred(D, real, *args)


def r2_penalty(D, real: torch.Tensor | None, fake: torch.Tensor, *args) -> torch.Tensor:
    """R2 (Mescheder et al. 2018, Eq. 10; Huang et al. 2024, Eq. 4): E_z[||grad_x D(x)||^2] at x = G(z), the
    zero-centred penalty on fake data; the caller weighs it by gamma / 2. With R1 it keeps D flat where
    either distribution lies, which R3GAN's local convergence proof (Sec. 2.2, Prop. 2) needs."""
    return _zero_centred(D, fake, *args)


@torch.no_grad()
def clip_weights(D: torch.nn.Module, c: float) -> None:
    """WGAN's weight clipping to [-c, c] after each critic update (Arjovsky et al. 2017, Alg. 1)."""
    for p in D.parameters():
        p.clamp_(-c, c)


PENALTIES = {"gp": gradient_penalty, "r1": r1_penalty, "r2": r2_penalty}  # penalty(D, real, fake, *labels)
CONSTRAINTS = {"clip": clip_weights}                     # constraint(D, weight), after D's step


@dataclass(frozen=True)
class Regulariser:
    """A regulariser of D: a penalty (D/<name> is logged) added to D's loss times `weight`, or a constraint
    applied to D's weights after its step with bound `weight`. A penalty with every > 1 is lazy (Karras
    et al. 2020, StyleGAN2, Sec. 3.1): it runs as a phase of its own every `every` steps, weighted by
    `every` so its average weight is unchanged."""

    name: str
    weight: float
    every: int = 1

    @property
    def constraint(self) -> bool:
        return self.name in CONSTRAINTS

    @property
    def reads_fakes(self) -> bool:
        """The penalty is taken at G's samples (R2, the gradient penalty): a lazy one draws its own."""
        return self.name in ("gp", "r2")

    def penalty(self, D, real: torch.Tensor, fake: torch.Tensor, *labels) -> torch.Tensor:
        return PENALTIES[self.name](D, real, fake, *labels)

    def apply(self, D: torch.nn.Module) -> None:
        CONSTRAINTS[self.name](D, self.weight)
