"""GAN losses and discriminator regularisers: small functions on D's logits, each with its paper.

A loss is a pair (d_loss(real, fake), g_loss(fake)) of functions of D's raw outputs; `model.loss=`
picks one from LOSSES. The penalties take D and the images, because they differentiate D's output
with respect to its input.
"""

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


def g_loss_ns(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss (Goodfellow et al. 2014, Sec. 3): maximise log D(G(z)), which gives
    strong gradients early on, when D rejects every sample and log(1 - D(G(z))) is flat."""
    return F.softplus(-fake).mean()


def g_loss_minimax(fake: torch.Tensor) -> torch.Tensor:
    """The saturating G loss of Eq. 1 itself: minimise log(1 - D(G(z)))."""
    return -F.softplus(fake).mean()


# Wasserstein GAN (Arjovsky et al. 2017, Eq. 3): the critic D estimates the Earth-Mover distance
#     W(P_r, P_g) = max_{||D||_L <= 1}  E_x[D(x)] - E_z[D(G(z))],
# and G minimises it. The Lipschitz bound comes from weight clipping (wgan) or a gradient penalty (wgan_gp).


def d_loss_wgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return fake.mean() - real.mean()


def g_loss_wgan(fake: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]; also hinge's G loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 17)."""
    return -fake.mean()


def d_loss_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss (Lim & Ye 2017; Miyato et al. 2018, Eq. 16): E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]."""
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


# Least-squares GAN (Mao et al. 2017, Eq. 2) with the 0-1 coding a = 0 (fake), b = c = 1 (real):
#     D: 1/2 E[(D(x) - 1)^2] + 1/2 E[D(G(z))^2]        G: 1/2 E[(D(G(z)) - 1)^2]


def d_loss_lsgan(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (real - 1).pow(2).mean() + 0.5 * fake.pow(2).mean()


def g_loss_lsgan(fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (fake - 1).pow(2).mean()


LOSSES = {
    "ns": (d_loss, g_loss_ns),
    "minimax": (d_loss, g_loss_minimax),
    "wgan": (d_loss_wgan, g_loss_wgan),
    "wgan_gp": (d_loss_wgan, g_loss_wgan),
    "hinge": (d_loss_hinge, g_loss_wgan),
    "lsgan": (d_loss_lsgan, g_loss_lsgan),
}


def _input_grad_norm2(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """||grad_x D(x)||^2 per example, kept in the graph so the penalty itself can be trained on."""
    (grad,) = torch.autograd.grad(outputs.sum(), inputs, create_graph=True)
    return grad.flatten(1).pow(2).sum(1)


def gradient_penalty(D, real: torch.Tensor, fake: torch.Tensor, *args) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017, Eq. 3): E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = e x + (1 - e) G(z),
    e ~ U[0, 1] per example; the caller weighs it by lambda. `args` (class labels) go on to D."""
    e = per_example(lambda m: torch.rand(m, *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype), len(real))
    x_hat = (e * real.detach() + (1 - e) * fake.detach()).requires_grad_(True)
    return (_input_grad_norm2(D(x_hat, *args).float(), x_hat).sqrt() - 1).pow(2).mean()


def r1_penalty(D, real: torch.Tensor, *args) -> torch.Tensor:
    """R1 (Mescheder et al. 2018, Eq. 9): E_x[||grad_x D(x)||^2] on real data only; the caller weighs it
    by gamma / 2. It pulls D's gradient to zero on the data manifold, where an equilibrium can hold."""
    x = real.detach().requires_grad_(True)
    return _input_grad_norm2(D(x, *args).float(), x).mean()
