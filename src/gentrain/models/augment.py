"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image D sees.

D overfits a small dataset and its feedback to G degrades. Augmenting only the real images would
teach G to produce augmented images, so the same random transforms go to real and fake images alike,
in both D's and G's steps, and they are differentiable so G's gradient passes through them
(Zhao et al. 2020, Sec. 3, Fig. 4). The three transforms are the paper's policy "color,translation,
cutout"; each example draws its own parameters. Images are in [-1, 1].
"""

import torch
import torch.nn.functional as F


def color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5), per example."""
    n = len(x)
    x = x + (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by a random whole number of pixels, up to 1/8 of its side, padding with zeros."""
    n, _, h, w = x.shape
    shift = torch.stack([torch.randint(-int(h * ratio), int(h * ratio) + 1, (n,), device=x.device),
                         torch.randint(-int(w * ratio), int(w * ratio) + 1, (n,), device=x.device)], 1)
    # An affine grid that moves by whole pixels, read with nearest sampling: an exact shift whose
    # gradient is the same shift backwards.
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 1] / w
    theta[:, 1, 2] = -2 * shift[:, 0] / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """Zero a square of half the image's side at a random place in each image (DeVries & Taylor 2017)."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h + 1 - ch, (n, 1, 1), device=x.device)
    left = torch.randint(0, w + 1 - cw, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device)[None, :, None]
    cols = torch.arange(w, device=x.device)[None, None, :]
    hole = (rows >= top) & (rows < top + ch) & (cols >= left) & (cols < left + cw)
    return x * (~hole)[:, None].to(x.dtype)


POLICIES = {"color": color, "translation": translation, "cutout": cutout}


def parse(policy) -> list:
    """[color, translation, cutout] (or 'color,translation,cutout') -> the transforms, in that order."""
    names = [str(p).strip() for p in (policy.split(",") if isinstance(policy, str) else policy or [])]
    names = [p for p in names if p]
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not a DiffAugment transform; choose from {', '.join(POLICIES)}")
    return [POLICIES[p] for p in names]


def diff_augment(x: torch.Tensor, transforms: list) -> torch.Tensor:
    for t in transforms:
        x = t(x)
    return x
