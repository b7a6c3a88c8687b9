"""DCGAN-style convolutional stacks (Radford et al. 2016) shared by the GAN and the VAE, and the rule that
sizes every architecture here.

The rule: an image is grown from a 4x4 seed (7x7 for MNIST's own 28 px) by stride-2 layers that each double
the side, so a power of two from 16 to 512 px takes log2(size) - 2 of them. Widths halve on the way up
to the image and double on the way down, up to 8 x `ch`, so `ch` is the width of the layer next to the
pixels and the widest layer is never more than 8 x `ch` at any size.
"""

import math

import torch
from torch import nn

from gentrain.errors import GentrainError

SIZES = (16, 28, 32, 64, 128, 256, 512)  # the image sides the rule covers
MAX_WIDTH = 8  # x ch


def plan(image_size: int) -> tuple[int, int]:
    """(side of the smallest feature map, number of stride-2 layers) of an image side."""
    if image_size not in SIZES:
        raise GentrainError(f"dataset.image_size must be one of {', '.join(map(str, SIZES))}, got {image_size!r}")
    return (7, 2) if image_size == 28 else (4, int(math.log2(image_size)) - 2)


def widths(ch: int, n: int) -> list[int]:
    """The widths of n stride-2 levels, from the one next to the image outwards: ch, 2ch, 4ch, ... up to 8ch."""
    return [ch * min(2 ** k, MAX_WIDTH) for k in range(n)]


class Decoder(nn.Module):
    """z (N, z_dim) -> image-shaped output (N, channels, size, size), before any output activation.

    With num_classes, a learned class embedding is concatenated to z (the conditional GAN of
    Mirza & Osindero 2014), and forward takes the labels y."""

    def __init__(self, z_dim: int, channels: int, image_size: int, ch: int, norm: bool = True, num_classes: int = 0):
        super().__init__()
        base, n_up = plan(image_size)
        up = widths(ch, n_up)[::-1]  # from the seed towards the image
        Norm = nn.BatchNorm2d if norm else (lambda c: nn.Identity())
        self.embed = nn.Embedding(num_classes, z_dim) if num_classes else None
        if self.embed is not None:
            # The class code starts small beside z (std 0.1 against 1), so G learns to use z before the
            # label can stand in for it: with N(0, 1) codes G ignored z on MNIST (recall 0 at 1,500 steps).
            nn.init.normal_(self.embed.weight, 0.0, 0.1)
        z_in = 2 * z_dim if num_classes else z_dim
        layers = [nn.ConvTranspose2d(z_in, up[0], base, 1, 0, bias=not norm), Norm(up[0]), nn.ReLU(True)]
        for w_in, w_out in zip(up, up[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=not norm), Norm(w_out), nn.ReLU(True)]
        layers.append(nn.ConvTranspose2d(up[-1], channels, 4, 2, 1))
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
        down = widths(ch, n_down)
        layers = [nn.Conv2d(channels, ch, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        for w_in, w_out in zip(down, down[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=not norm), Norm(w_out), nn.LeakyReLU(0.2, True)]
        width = down[-1]
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
