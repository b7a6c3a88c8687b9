"""R3GAN's generator and discriminator (Huang, Gokaslan, Kuleshov, Tompkin 2024, "The GAN is dead; long live
the GAN! A Modern GAN Baseline", Sec. 3, Config E), at gentrain's sizes: normalisation-free residual
networks whose blocks are ConvNeXt-style inverted bottlenecks with grouped convolutions, initialised so
that every block starts as the identity.

Which row of the paper's roadmap (Table 1) each choice comes from:
- Config B, stripped StyleGAN2: no mapping network, no style modulation or noise inputs, no minibatch
  standard deviation, no path-length regulariser; a plain z enters G.
- Config C, the well-behaved loss: RpGAN + R1 + R2 (models/losses.py; `model.loss=rpgan model.r1 model.r2`).
- Config D, modernised ResNet: pre-activation-free residual blocks with 1x1-3x3-1x1 layers, leaky ReLU
  (slope 0.2), no normalisation layer anywhere, bilinear resampling in the transitions between stages
  (not strided or transposed convolutions), a learned 4x4 basis modulated by z as G's input and its
  transpose (a depthwise full-size convolution) as D's output; the fix-up initialisation below.
- Config E, the bottleneck: the 3x3 convolution grouped (16 channels a group) between 1x1 layers that widen
  the block by an expansion factor of 2 (an inverted bottleneck).

Sized by gentrain's rule (models/nets.py): stages from the smallest side (4x4, or 7x7 at 28 px) to the
image, `ch` wide next to the pixels and twice as wide at each halving, up to 8 x `ch`; two blocks a stage
as the paper's CIFAR-10 network. The paper's widths are larger (768 at CIFAR-10); `model.ch` scales them.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.models.nets import plan, widths

BLOCKS = 2        # residual blocks per stage (the paper's CIFAR-10 network)
EXPANSION = 2     # the inverted bottleneck's widening (Config E)
GROUP = 16        # channels per group of the 3x3 convolution (Config E's cardinality: width / 16)
SLOPE = 0.2       # leaky ReLU


def msr_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """He et al. 2015's initialisation, N(0, gain^2 / fan_in), with a zero bias; gain 0 zeroes the layer."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class Block(nn.Module):
    """x + conv1x1(act(conv3x3_grouped(act(conv1x1(x))))): an inverted bottleneck with no normalisation.

    Fix-up initialisation (Zhang et al. 2019; R3GAN Sec. 3, Config D): the last layer of the residual branch
    starts at zero, so a fresh block is the identity, and the other two are scaled by L^(-1/(2m-2)) for L
    blocks in the network of m = 3 layers each, so the signal's variance stays bounded as blocks add up."""

    def __init__(self, width: int, total_blocks: int):
        super().__init__()
        wide = width * EXPANSION
        gain = math.sqrt(2 / (1 + SLOPE ** 2)) * total_blocks ** (-1 / (2 * 3 - 2))
        self.expand = msr_init(nn.Conv2d(width, wide, 1), gain)
        self.conv = msr_init(nn.Conv2d(wide, wide, 3, 1, 1, groups=max(1, wide // GROUP)), gain)
        self.project = msr_init(nn.Conv2d(wide, width, 1, bias=False), 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.expand(x), SLOPE)
        h = F.leaky_relu(self.conv(h), SLOPE)
        return x + self.project(h)


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the side with the [1, 2, 1] binomial filter (the paper's interpolative downsampler): a fixed
    depthwise convolution, which R1 and R2 can differentiate twice."""
    k = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    k = (k[:, None] * k[None, :] / 16).expand(x.shape[1], 1, 3, 3)
    return F.conv2d(x, k, stride=2, padding=1, groups=x.shape[1])


class R3GANG(nn.Module):
    """z -> a learned base x base basis, each channel scaled by a linear map of z -> stages of blocks, each
    after a 1x1 conv to its width and a bilinear 2x upsampling -> a 1x1 conv to the image (before tanh)."""

    def __init__(self, z_dim: int, channels: int, image_size: int, ch: int):
        super().__init__()
        self.base, n_up = plan(image_size)
        up = widths(ch, n_up + 1)[::-1]  # from the basis towards the image
        total = BLOCKS * len(up)
        self.basis = nn.Parameter(torch.randn(up[0], self.base, self.base))
        self.linear = msr_init(nn.Linear(z_dim, up[0], bias=False))
        self.stages = nn.ModuleList(nn.Sequential(*[Block(w, total) for _ in range(BLOCKS)]) for w in up)
        self.transitions = nn.ModuleList(msr_init(nn.Conv2d(a, b, 1, bias=False)) for a, b in zip(up, up[1:]))
        self.out = msr_init(nn.Conv2d(up[-1], channels, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.basis[None] * self.linear(z)[:, :, None, None]
        h = self.stages[0](h)
        for transition, stage in zip(self.transitions, self.stages[1:]):
            h = stage(F.interpolate(transition(h), scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(h)


class R3GAND(nn.Module):
    """image -> a 1x1 conv to `ch` -> stages of blocks, each followed by a [1, 2, 1] 2x downsampling and a
    1x1 conv to the next width -> at the smallest side, a depthwise base x base conv (the basis read back)
    and a linear map to one score."""

    def __init__(self, channels: int, image_size: int, ch: int):
        super().__init__()
        base, n_down = plan(image_size)
        down = widths(ch, n_down + 1)  # from the image inwards
        total = BLOCKS * len(down)
        self.inp = msr_init(nn.Conv2d(channels, down[0], 1))
        self.stages = nn.ModuleList(nn.Sequential(*[Block(w, total) for _ in range(BLOCKS)]) for w in down)
        self.transitions = nn.ModuleList(msr_init(nn.Conv2d(a, b, 1, bias=False)) for a, b in zip(down, down[1:]))
        self.basis = msr_init(nn.Conv2d(down[-1], down[-1], base, groups=down[-1], bias=False))
        self.score = msr_init(nn.Linear(down[-1], 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for stage, transition in zip(self.stages, self.transitions):
            h = transition(downsample(stage(h)))
        h = self.basis(self.stages[-1](h)).flatten(1)
        return self.score(h)
