"""The gated PixelCNN prior over a VQ-VAE's grid of codes: masked convolutions, trained by maximum
likelihood and sampled one cell at a time in raster order (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders", the gated PixelCNN; masks as in "Pixel Recurrent Neural Networks")."""

import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv2d(nn.Conv2d):
    """A convolution whose kernel is multiplied by a fixed 0/1 mask at every use (van den Oord et al. 2016,
    Pixel RNN, Sec. 3.4), so no output ever reads the inputs the mask hides, whatever the weights learn."""

    def __init__(self, c_in: int, c_out: int, mask: torch.Tensor):
        kh, kw = mask.shape
        super().__init__(c_in, c_out, (kh, kw), padding=(kh // 2, kw // 2))
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


def gate(h: torch.Tensor) -> torch.Tensor:
    """The gated activation tanh(W_f * x) . sigmoid(W_g * x) (van den Oord et al. 2016, Eq. 2); h holds
    both convolutions' outputs, stacked on channels."""
    f, g = h.chunk(2, 1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    """One layer of the gated PixelCNN (van den Oord et al. 2016, Fig. 2): a vertical stack that reads the
    rows above and its own row, and a horizontal stack that reads the cells to its left in its row (and
    the cell itself, except in the first layer: mask A) plus the vertical stack shifted down one row.
    The horizontal stack at (r, c) therefore reads every cell before (r, c) in raster order and nothing
    after it, without the blind spot of a plain masked 3x3 stack."""

    def __init__(self, width: int, first: bool, k: int = 3):
        super().__init__()
        v_mask, h_mask = torch.ones(k, k), torch.ones(1, k)
        v_mask[k // 2 + 1:] = 0                       # rows below the centre
        h_mask[0, k // 2 + (0 if first else 1):] = 0  # columns right of the centre, and the centre in layer 1
        self.v, self.h = MaskedConv2d(width, 2 * width, v_mask), MaskedConv2d(width, 2 * width, h_mask)
        self.v_to_h = nn.Conv2d(2 * width, 2 * width, 1)
        self.h_out = nn.Conv2d(width, width, 1)
        self.first = first

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v_pre = self.v(v)
        # The vertical stack at row r has read row r itself: the horizontal stack gets it from row r - 1.
        above = F.pad(v_pre, (0, 0, 1, 0))[:, :, :-1]
        out = self.h_out(gate(self.h(h) + self.v_to_h(above)))
        # No residual in the first layer: its input at (r, c) is the very code being predicted there.
        return gate(v_pre), out if self.first else h + out


class PixelCNN(nn.Module):
    """p(codes) = prod_i p(c_i | c_<i) over a grid of code indices in raster order: logits (N, K, H, W)."""

    def __init__(self, num_codes: int, width: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(num_codes, width)
        self.layers = nn.ModuleList(GatedLayer(width, first=i == 0) for i in range(layers))
        self.out = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 1), nn.ReLU(), nn.Conv2d(width, num_codes, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        v = h = self.embed(codes).permute(0, 3, 1, 2)
        for layer in self.layers:
            v, h = layer(v, h)
        return self.out(h)

    def nll(self, codes: torch.Tensor) -> torch.Tensor:
        """-log p(codes) per grid, in nats: the cross-entropy of every cell's code, summed."""
        return F.cross_entropy(self(codes).float(), codes, reduction="none").flatten(1).sum(1)

    @torch.no_grad()
    def sample(self, u: torch.Tensor) -> torch.Tensor:
        """Ancestral sampling, cell by cell in raster order, each code drawn from p(c_i | c_<i) by inverting
        its CDF at the uniform u[:, r, c]: the same uniforms (N, H, W) in [0, 1) always give the same codes."""
        codes = torch.zeros(u.shape, dtype=torch.long, device=u.device)
        _, rows, cols = u.shape
        for r in range(rows):
            for c in range(cols):
                cdf = F.softmax(self(codes)[:, :, r, c].float(), 1).cumsum(1)
                codes[:, r, c] = (cdf < u[:, r, c, None]).sum(1).clamp(max=cdf.shape[1] - 1)
        return codes
