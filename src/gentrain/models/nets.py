"""DCGAN-style convolutional stacks (Radford et al. 2016) shared by the GAN and the VAE.

A 28 px image is built from a 7x7 seed, 32 and 64 px images from a 4x4 seed; each stride-2
layer doubles the side. Widths halve on the way up to the image and double on the way down,
so `ch` is the width of the layer next to the pixels.
"""

import torch
from torch import nn

from gentrain.errors import GentrainError

# image size -> (side of the smallest feature map, number of stride-2 layers)
PLANS = {28: (7, 2), 32: (4, 3), 64: (4, 4)}


def plan(image_size: int) -> tuple[int, int]:
    if image_size not in PLANS:
        raise GentrainError(f"dataset.image_size must be one of {', '.join(map(str, PLANS))}, got {image_size!r}")
    return PLANS[image_size]


class Decoder(nn.Module):
    """z (N, z_dim) -> image-shaped output (N, channels, size, size), before any output activation.

    With num_classes, a learned class embedding is concatenated to z (the conditional GAN of
    Mirza & Osindero 2014), and forward takes the labels y."""

    def __init__(self, z_dim: int, channels: int, image_size: int, ch: int, norm: bool = True, num_classes: int = 0):
        super().__init__()
        base, n_up = plan(image_size)
        width = ch * 2 ** (n_up - 1)
        Norm = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        if self.embed is not None:
            # The class code starts small beside z (std 0.1 against 1), so G learns to use z before the
            # label can stand in for it: with N(0, 1) codes G ignored z on MNIST (recall 0 at 1,500 steps).
            nn.init.normal_(self.embed.weight, 0.0, 0.1)
        z_in = 2 * z_dim if num_classes else z_dim
        layers = [nn.ConvTranspose2d(z_in, width, base, 1, 0, bias=not norm), Norm(width), nn.ReLU(True)]
        for _ in range(n_up - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=not norm), Norm(width // 2), nn.ReLU(True)]
            width //= 2
        layers.append(nn.ConvTranspose2d(width, channels, 4, 2, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(y)], 1)
        return self.net(z[:, :, None, None])


class Encoder(nn.Module):
    """image (N, channels, size, size) -> (N, out_dim). No norm on the first layer, as in DCGAN's D.
    out_dim=0 leaves out the last layer: the flattened final feature map, for a projection head."""

    def __init__(self, channels: int, image_size: int, ch: int, out_dim: int, norm: bool = True):
        super().__init__()
        base, n_down = plan(image_size)
        Norm = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        layers = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = ch
        for _ in range(n_down - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=not norm), Norm(width * 2), nn.LeakyReLU(0.2, True)]
            width *= 2
        # A base x base "valid" convolution reads the whole final feature map, as DCGAN's last D layer.
        if out_dim:
            layers.append(nn.Conv2d(width, out_dim, base, 1, 0))
        self.features = width * base * base
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN's init: conv weights from N(0, 0.02), batch-norm scales from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class MLP(nn.Module):
    """in_dim -> [Linear, activation] x depth -> out_dim: G and D for 2-D toy data (ring8, grid25)."""

    def __init__(self, in_dim: int, out_dim: int, width: int, depth: int, act: type = nn.ReLU):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, width), act()]
            d = width
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
