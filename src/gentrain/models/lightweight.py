"""The lightweight GAN of Liu et al. 2021 ("Towards Faster and Stabilized GAN Training for High-fidelity
Few-shot Image Synthesis", FastGAN), for 128-512 px images on one GPU and small folders: a generator with
skip-layer excitation, and a discriminator that is also trained to reconstruct its input from its own
features, which keeps it from overfitting a few hundred images.

Widths follow the paper's table (ngf x {4: 16, 8: 8, 16: 4, 32: 2, 64: 2, 128: 1, 256: 0.5, 512: 0.25}),
written as one rule, `ch * max(64 / r, min(2, 128 / r))` at resolution r. Two simplifications of the
paper's code: every up-block is the plain one (upsample, conv, batch norm, GLU) without its noise
injection, and the reconstruction distance is the mean squared error instead of LPIPS, whose weights
would have to be downloaded.
"""

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.dist import per_example


def width(ch: int, res: int) -> int:
    """The paper's channel table as one rule: ngf * multiplier(resolution)."""
    return max(1, int(ch * max(64 / res, min(2, 128 / res))))


def up_block(c_in: int, c_out: int) -> nn.Sequential:
    """Nearest upsampling, a 3x3 conv to twice the width, batch norm and a GLU that halves it again
    (Liu et al. 2021, Fig. 3; the GLU of Dauphin et al. 2017)."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, 2 * c_out, 3, 1, 1, bias=False),
                         nn.BatchNorm2d(2 * c_out), nn.GLU(dim=1))


class SLE(nn.Module):
    """Skip-layer excitation (Liu et al. 2021, Eq. 1):  y = F(x_low, {W_i}) * x_high, where F pools the low
    resolution feature map to 4x4, reads it with a 4x4 conv to one value per channel, a leaky ReLU, a 1x1
    conv to the high map's width and a sigmoid: a channel-wise gate from 8x8 onto 128x128 (16 onto 256,
    32 onto 512), cheap as a gradient shortcut and a style-like modulation."""

    def __init__(self, c_low: int, c_high: int):
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Conv2d(c_low, c_high, 4, 1, 0, bias=False),
                                  nn.LeakyReLU(0.1), nn.Conv2d(c_high, c_high, 1, 1, 0, bias=False), nn.Sigmoid())

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        return high * self.gate(low)


class LightweightG(nn.Module):
    """z -> 4x4 (transposed conv, batch norm, GLU) -> up-blocks to the image side, with SLE from 8 to 128,
    16 to 256 and 32 to 512 where the image reaches them -> 3x3 conv to the image (before tanh)."""

    def __init__(self, z_dim: int, channels: int, image_size: int, ch: int):
        super().__init__()
        self.init = nn.Sequential(nn.ConvTranspose2d(z_dim, 2 * width(ch, 4), 4, 1, 0, bias=False),
                                  nn.BatchNorm2d(2 * width(ch, 4)), nn.GLU(dim=1))
        self.sides = [2 ** k for k in range(3, image_size.bit_length())]  # 8, 16, ..., image_size
        self.up = nn.ModuleList(up_block(width(ch, r // 2), width(ch, r)) for r in self.sides)
        self.sle = nn.ModuleDict({str(r): SLE(width(ch, r // 16), width(ch, r)) for r in self.sides if r >= 128})
        self.out = nn.Conv2d(width(ch, image_size), channels, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h, feats = self.init(z[:, :, None, None]), {}
        for r, block in zip(self.sides, self.up):
            h = block(h)
            if str(r) in self.sle:
                h = self.sle[str(r)](feats[r // 16], h)
            feats[r] = h
        return self.out(h)


def down_block(c_in: int, c_out: int) -> nn.Sequential:
    """A 4x4 stride-2 conv, batch norm and leaky ReLU (the paper's DownBlock)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2))


class Decoder(nn.Module):
    """The discriminator's small decoder: an 8x8 feature map up to a `side` px image (tanh), trained only
    through the reconstruction loss."""

    def __init__(self, c_in: int, channels: int, side: int, ch: int):
        super().__init__()
        n = side.bit_length() - 4  # 8 -> side in doublings
        c = [c_in] + [max(8, ch // 2)] * n
        self.net = nn.Sequential(*[up_block(a, b) for a, b in zip(c, c[1:])], nn.Conv2d(c[-1], channels, 3, 1, 1),
                                 nn.Tanh())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.net(f)


class LightweightD(nn.Module):
    """image -> 3x3 conv at full size -> down-blocks to 8x8 -> a 1x1 and a 4x4 conv to a 5x5 map of real/fake
    logits (flattened, so the loss averages over it). With reconstruct=True it also returns the paper's
    self-supervised loss on real images (Liu et al. 2021, Sec. 3.2):

        L_recons = E_{f ~ D_encode(x), x ~ I_real} [ || G(f) - T(x) || ],

    where f are D's 8x8 features (decoded to the whole image, T = downsampling) and a random quadrant of
    its 16x16 features (decoded to that quadrant of the image, T = cropping, then downsampling)."""

    def __init__(self, channels: int, image_size: int, ch: int):
        super().__init__()
        self.side = min(image_size, 128)  # the decoders' output side
        self.stem = nn.Sequential(nn.Conv2d(channels, width(ch, image_size), 3, 1, 1, bias=False), nn.LeakyReLU(0.2))
        sides = [2 ** k for k in range(image_size.bit_length() - 1, 3, -1)]  # image_size, ..., 16
        self.down = nn.ModuleList(down_block(width(ch, r), width(ch, r // 2)) for r in sides)
        self.logits = nn.Sequential(nn.Conv2d(width(ch, 8), width(ch, 8), 1, 1, 0, bias=False),
                                    nn.BatchNorm2d(width(ch, 8)), nn.LeakyReLU(0.2), nn.Conv2d(width(ch, 8), 1, 4, 1, 0))
        self.decode_all = Decoder(width(ch, 8), channels, self.side, ch)
        self.decode_part = Decoder(width(ch, 16), channels, self.side, ch)

    def forward(self, x: torch.Tensor, reconstruct: bool = False):
        h = self.stem(x)
        feats = {h.shape[-1]: h}
        for block in self.down:
            h = block(h)
            feats[h.shape[-1]] = h
        logits = self.logits(h).flatten(1)
        if not reconstruct:
            return logits
        return logits, reconstruction_loss(x, feats[8], feats[16], self.decode_all, self.decode_part, self.side)


def quadrant(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Quadrant q[i] in 0..3 (top-left, top-right, bottom-left, bottom-right) of each map t[i], gathered on
    the device (no host sync)."""
    n, c, h, w = t.shape
    quads = t.view(n, c, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(n, 4, c, h // 2, w // 2)
    return quads[torch.arange(n, device=t.device), q]


def reconstruction_loss(x, f8, f16, decode_all, decode_part, side: int) -> torch.Tensor:
    """L_recons of Liu et al. 2021 with the squared error as the distance, averaged over pixels: the 8x8
    features decode to the image downsampled to `side`, and a random quadrant of the 16x16 features decodes
    to that quadrant of the image, resized to `side`. One quadrant drawn per example."""
    q = per_example(lambda m: torch.randint(0, 4, (m,), device=x.device), len(x))
    target_all = F.interpolate(x, size=side, mode="area") if x.shape[-1] != side else x
    target_part = F.interpolate(quadrant(x, q), size=side, mode="area")
    rec_all = decode_all(f8).float()
    rec_part = decode_part(quadrant(f16, q)).float()
    return F.mse_loss(rec_all, target_all.float()) + F.mse_loss(rec_part, target_part.float())
