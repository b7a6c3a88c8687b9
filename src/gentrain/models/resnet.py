"""Residual networks: SNGAN's ResNet generator and discriminator (Miyato et al. 2018, App. B.4, Table 4:
CIFAR-10), with class-conditional batch norm in G and the projection head in D for conditional models
(Miyato & Koyama 2018); and, from the same blocks without any norm, the encoder and decoder of the
VAE's `arch=resnet` and of the VQ-VAE. Sized by the same plans as the DCGAN stacks: 32 px grows from
4x4 in three up-blocks.
"""

import torch
import torch.nn.functional as F
from torch import nn

from gentrain.models.nets import plan


class CondBatchNorm(nn.BatchNorm2d):
    """Batch norm whose scale and shift come from the class (de Vries et al. 2017; Miyato & Koyama
    2018, Sec. 4): gamma_y = 1 + E_g[y], beta_y = E_b[y]. Without classes it is plain batch norm."""

    def __init__(self, width: int, num_classes: int = 0):
        super().__init__(width, affine=num_classes == 0)
        if num_classes:
            self.gain, self.bias_y = nn.Embedding(num_classes, width), nn.Embedding(num_classes, width)
            nn.init.zeros_(self.gain.weight)
            nn.init.zeros_(self.bias_y.weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x)
        if y is None:
            return out
        return out * (1 + self.gain(y))[:, :, None, None] + self.bias_y(y)[:, :, None, None]


class NoNorm(nn.Module):
    """No normalisation, called as CondBatchNorm is."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return x


class GBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus an upsampled 1x1-conv shortcut (He et al. 2016, pre-activation).
    norm=False leaves out both batch norms."""

    def __init__(self, c_in: int, c_out: int, num_classes: int = 0, norm: bool = True):
        super().__init__()
        Norm = (lambda c: CondBatchNorm(c, num_classes)) if norm else (lambda c: NoNorm())
        self.bn1, self.bn2 = Norm(c_in), Norm(c_out)
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x, y=None):
        h = F.interpolate(F.relu(self.bn1(x, y)), scale_factor=2)
        h = self.conv2(F.relu(self.bn2(self.conv1(h), y)))
        return h + self.skip(F.interpolate(x, scale_factor=2))


class ResNetG(nn.Module):
    """z -> linear to base x base x width -> up-blocks -> BN-ReLU-conv3 to the image (before tanh)."""

    def __init__(self, z_dim: int, channels: int, image_size: int, width: int, num_classes: int = 0):
        super().__init__()
        self.base, n_up = plan(image_size)
        self.width = width
        self.linear = nn.Linear(z_dim, self.base * self.base * width)
        self.blocks = nn.ModuleList(GBlock(width, width, num_classes) for _ in range(n_up))
        self.out = nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, channels, 3, 1, 1))

    def forward(self, z, y=None):
        h = self.linear(z).view(len(z), self.width, self.base, self.base)
        for block in self.blocks:
            h = block(h, y)
        return self.out(h)


class DBlock(nn.Module):
    """ReLU-conv3-ReLU-conv3 (-avgpool), plus a 1x1-conv (-avgpool) shortcut; the first block of D
    skips the leading ReLU so the image itself is not rectified (SNGAN's "optimized" block)."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c_in, c_out, 3, 1, 1), nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or down) else nn.Identity()
        self.down, self.first = down, first

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(x if self.first else F.relu(x))))
        skip = x
        if self.down:
            h = F.avg_pool2d(h, 2)
            # The first block pools before its shortcut conv, the others after (as SNGAN's code).
            skip = self.skip(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.skip(x), 2)
        else:
            skip = self.skip(x)
        return h + skip


class ResNetD(nn.Module):
    """image -> features phi(x) (N, width): down-blocks, two plain blocks, ReLU, global sum pooling."""

    def __init__(self, channels: int, image_size: int, width: int):
        super().__init__()
        _, n_down = plan(image_size)
        blocks = [DBlock(channels, width, down=True, first=True)]
        blocks += [DBlock(width, width, down=True) for _ in range(n_down - 2)]
        blocks += [DBlock(width, width, down=False), DBlock(width, width, down=False)]
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = width

    def forward(self, x):
        return F.relu(self.blocks(x)).sum((2, 3))


# The VAE and the VQ-VAE score every image on its own (the IWAE bound, test likelihoods, encode/decode
# of single images) and data parallelism assumes it too: their residual stacks carry no batch norm,
# which would mix the examples of a batch.


class ResEncoder(nn.Module):
    """image (N, channels, s, s) -> (N, out, s / 2^n_down, s / 2^n_down): a down-block per halving
    (SNGAN's D blocks, which have no norm), `extra` blocks at the smallest side, ReLU, and a last conv
    with kernel `head`: 1 keeps a grid of vectors (VQ-VAE), the smallest side reads the whole map into
    one vector (the VAE, as DCGAN's last layer)."""

    def __init__(self, channels: int, width: int, out: int, n_down: int, head: int = 1, extra: int = 1):
        super().__init__()
        blocks = [DBlock(channels, width, down=True, first=True)]
        blocks += [DBlock(width, width, down=True) for _ in range(n_down - 1)]
        blocks += [DBlock(width, width, down=False) for _ in range(extra)]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(width, out, head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.blocks(x)))


class ResDecoder(nn.Module):
    """A grid (N, c_in, s, s), or a vector (N, c_in) widened to stem x stem, -> image-shaped output
    (N, out, s * 2^n_up, ...) before any output activation: `extra` blocks, an up-block per doubling (G's
    blocks without batch norm), ReLU and a 3x3 conv. With num_classes a vector gets a class embedding
    beside it, as the DCGAN decoder's."""

    def __init__(self, c_in: int, width: int, out: int, n_up: int, stem: int = 0, extra: int = 1,
                 num_classes: int = 0):
        super().__init__()
        self.embed = nn.Embedding(num_classes, c_in) if num_classes else None
        if self.embed is not None:
            nn.init.normal_(self.embed.weight, 0.0, 0.1)  # small beside z, as in nets.Decoder
        c_in = 2 * c_in if num_classes else c_in
        # A vector enters as a 1x1 map that a transposed conv widens to stem x stem (DCGAN's first layer).
        self.stem = nn.ConvTranspose2d(c_in, width, stem) if stem else nn.Conv2d(c_in, width, 3, 1, 1)
        blocks = [DBlock(width, width, down=False) for _ in range(extra)]
        blocks += [GBlock(width, width, norm=False) for _ in range(n_up)]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, out, 3, 1, 1)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:  # beside every cell of a grid
            e = self.embed(y)
            z = torch.cat([z, e if z.ndim == 2 else e[:, :, None, None].expand(-1, -1, *z.shape[2:])], 1)
        if z.ndim == 2:
            z = z[:, :, None, None]
        return self.out(F.relu(self.blocks(self.stem(z))))
