"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image D sees.

D overfits a small dataset and its feedback to G degrades. Augmenting only the real images would
teach G to produce augmented images, so the same random transforms go to real and fake images alike,
in both D's and G's steps, and they are differentiable so G's gradient passes through them
(Zhao et al. 2020, Sec. 3, Fig. 4). The three transforms are the paper's policy "color,translation,
cutout"; each example draws its own parameters. Images are in [-1, 1].
"""

import torch
import torch.nn.functional as F

from gentrain.dist import per_example


def _rand(x: torch.Tensor) -> torch.Tensor:
    """U[0, 1) per example, shaped to broadcast over an image."""
    return per_example(lambda m: torch.rand(m, 1, 1, 1, device=x.device, dtype=x.dtype), len(x))


def _randint(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """An integer in [low, high) per example."""
    return per_example(lambda m: torch.randint(low, high, (m,), device=x.device), len(x))


def color(x: torch.Tensor) -> torch.Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5), per example."""
    x = x + (_rand(x) - 0.5)
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (_rand(x) * 2) + mean
    mean = x.mean((1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x) + 0.5) + mean


def translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by a random whole number of pixels, up to 1/8 of its side, padding with zeros."""
    n, _, h, w = x.shape
    shift = torch.stack([_randint(x, -int(h * ratio), int(h * ratio) + 1),
                         _randint(x, -int(w * ratio), int(w * ratio) + 1)], 1)
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
    _, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = _randint(x, 0, h + 1 - ch)[:, None, None]
    left = _randint(x, 0, w + 1 - cw)[:, None, None]
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


def diff_augment(x: torch.Tensor, transforms: list, p: torch.Tensor | float | None = None) -> torch.Tensor:
    """The transforms in turn. With a probability p (a number, or a device tensor that adaptive augmentation
    moves), each example takes each transform with probability p (ADA's per-transform probability,
    Karras et al. 2020, Sec. 2.3); None applies every transform to every example."""
    for t in transforms:
        if p is None:
            x = t(x)
        else:
            keep = per_example(lambda m: torch.rand(m, 1, 1, 1, device=x.device), len(x)) < p
            x = torch.where(keep, t(x), x)
    return x
