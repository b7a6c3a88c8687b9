"""Pixels in and out: the conversions between uint8 images and the [-1, 1] floats the models work in, and
every image file gentrain writes (sample grids, folders of single PNGs, scatter plots of 2-D points)."""

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import save_image

from gentrain import files
from gentrain.errors import GentrainError


def to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1], the range every model and network here works in."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 0..255, rounded as a PNG file stores it."""
    return ((images.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)


def image_format(path: Path) -> str:
    """PIL's name of the image format a file name asks for (.png -> PNG, .jpg -> JPEG)."""
    fmt = Image.registered_extensions().get(Path(path).suffix.lower())
    if fmt is None:
        raise GentrainError(f"{path}: {Path(path).suffix or 'no extension'} is not an image type; name the file "
                            f"*.png (or *.jpg), or end the path with / for a folder of single PNGs")
    return fmt


def is_image_file(path: Path) -> bool:
    """Does a path name an image file (an image extension, not an existing folder)?"""
    return Path(path).suffix.lower() in Image.registered_extensions() and not Path(path).is_dir()


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None, reference: torch.Tensor | None = None) -> None:
    """Images in [-1, 1] as one image grid (written atomically, files.atomic), about square unless nrow is
    given; 2-D points as a scatter plot over the `reference` (real) points."""
    if images.ndim == 2:
        return scatter(images.float().cpu(), path, reference)
    nrow = nrow or max(1, math.isqrt(len(images) - 1) + 1)
    fmt = image_format(path)
    with files.atomic(path) as tmp:
        save_image(images.float(), tmp, nrow=nrow, normalize=True, value_range=(-1, 1), format=fmt)


def save_pngs(images: torch.Tensor, folder: Path, start: int = 0) -> int:
    """Images in [-1, 1] as single PNG files 000000.png, 000001.png, ... from number `start` (greyscale
    stays single-channel), each written atomically; returns the next number."""
    files.make_dir(folder)
    for i, img in enumerate(to_uint8(images.cpu()), start):
        with files.atomic(folder / f"{i:06d}.png") as tmp:
            to_pil_image(img).save(tmp, format="PNG")
    return start + len(images)


def pyplot():
    """matplotlib's pyplot drawing to files only: no display needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def scatter(points, path: Path, reference=None) -> None:
    """2-D samples of a toy model as a scatter plot, over the real points (grey) when given."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, c="0.7", label="real")
    ax.scatter(points[:, 0], points[:, 1], s=2, c="tab:blue", alpha=0.6, label="samples")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A matplotlib figure as an image file, written atomically, and closed."""
    fmt = image_format(path).lower()
    try:
        with files.atomic(path) as tmp:
            fig.savefig(tmp, dpi=100, format="jpeg" if fmt == "jpeg" else fmt)
    finally:
        pyplot().close(fig)
