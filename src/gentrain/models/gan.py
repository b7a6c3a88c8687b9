"""The GAN family: a generator G and a discriminator D trained in two phases, D then G."""

import torch
import torch.nn.functional as F
from torch import nn

from gentrain import GentrainError
from gentrain.models.nets import Decoder, Encoder, dcgan_init

# Goodfellow et al. 2014, Eq. 1:
#     min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 - D(G(z)))]
# D outputs a logit l, D = sigmoid(l), so  -log D = softplus(-l)  and  -log(1 - D) = softplus(l);
# softplus keeps both terms finite where sigmoid saturates.


def d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """D ascends V: minimise  -log D(x) - log(1 - D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_ns(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss (Goodfellow et al. 2014, Sec. 3): maximise log D(G(z)), which gives
    strong gradients early on, when D rejects every sample and log(1 - D(G(z))) is flat."""
    return F.softplus(-fake_logits).mean()


def g_loss_minimax(fake_logits: torch.Tensor) -> torch.Tensor:
    """The saturating G loss of Eq. 1 itself: minimise log(1 - D(G(z)))."""
    return -F.softplus(fake_logits).mean()


LOSSES = {"ns": (d_loss, g_loss_ns), "minimax": (d_loss, g_loss_minimax)}


class GAN(nn.Module):
    phases = ("D", "G")

    def __init__(self, channels: int, image_size: int, z_dim: int = 100, ch: int = 64, loss: str = "ns"):
        super().__init__()
        if loss not in LOSSES:
            raise GentrainError(f"model.loss={loss!r} is not a GAN loss; choose from {', '.join(LOSSES)}")
        self.z_dim = z_dim
        self.d_loss, self.g_loss = LOSSES[loss]
        self.G = Decoder(z_dim, channels, image_size, ch)
        self.D = Encoder(channels, image_size, ch, 1)
        dcgan_init(self)

    def phase_parameters(self, phase: str):
        return {"D": self.D, "G": self.G}[phase].parameters()

    def noise(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        return torch.randn(n, self.z_dim, generator=generator, device=device)

    def sample(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] for the latent codes z."""
        return torch.tanh(self.G(z))

    def loss(self, phase: str, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.noise(x.shape[0], device=x.device)
        if phase == "D":
            with torch.no_grad():
                fake = self.sample(z)
            real_logits, fake_logits = self.D(x).float(), self.D(fake).float()
            loss = self.d_loss(real_logits, fake_logits)
            # D(x) and D(G(z)) as probabilities: the usual first look at whether D is winning.
            return loss, {"D/loss": loss.detach(), "D(x)": torch.sigmoid(real_logits).mean().detach(),
                          "D(G(z))": torch.sigmoid(fake_logits).mean().detach()}
        loss = self.g_loss(self.D(self.sample(z)).float())
        return loss, {"G/loss": loss.detach()}
