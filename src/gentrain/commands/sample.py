"""`gentrain sample ckpt=PATH`: images from a checkpoint alone, rebuilt from the config stored in it."""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gentrain import checkpoint, data, files, priors
from gentrain.config import check, config_dir
from gentrain.device import pick_device
from gentrain.errors import GentrainError, reported
from gentrain.images import image_format, save_grid, save_pngs, to_signed
from gentrain.models import generate, grid_codes
from gentrain.models.family import INTERPOLATE, RECONSTRUCT

STEPS = 10  # images per interpolation row


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; for GAN latents White 2016): Gaussian codes concentrate
    near a sphere of radius sqrt(z_dim), and a straight line between two of them cuts inside it."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def draw_test_images(cfg: DictConfig, ckpt: checkpoint.Checkpoint, n: int,
                     g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n random test images of the checkpoint's dataset, in [-1, 1], and their labels (None without)."""
    test = data.load(ckpt.dataset_config(cfg.data_root), split="test")
    pick = torch.randperm(len(test.images), generator=g)[:n]
    return to_signed(test.images[pick]), None if test.labels is None else test.labels[pick]


def check_mode(cfg: DictConfig, model, ckpt: checkpoint.Checkpoint) -> None:
    """What the model must be able to do for class= and mode=, checked before any work or write."""
    label = cfg.get("class")
    if label is not None:
        classes = model.num_classes
        if not classes:
            raise GentrainError(f"class={label} needs a conditional model (model.conditional=true); this one is not")
        if not label < classes:
            raise GentrainError(f"class must be an integer from 0 to {classes - 1}, got {label!r}")
    if cfg.mode == "reconstruct" and RECONSTRUCT not in model.capabilities:
        raise GentrainError(f"mode=reconstruct needs a VAE checkpoint (model=vae or vqvae); "
                            f"this one is a {ckpt.family}")


@torch.no_grad()
def images_for(cfg: DictConfig, model, ckpt: checkpoint.Checkpoint, device) -> tuple[torch.Tensor, int | None]:
    """The images the chosen mode asks for, in [-1, 1], and the grid's row length."""
    check_mode(cfg, model, ckpt)
    g = torch.Generator().manual_seed(cfg.seed)
    label = cfg.get("class")
    if cfg.mode == "grid":
        z, y, nrow = grid_codes(model, cfg.n, g, label)
        return generate(model, z, device, cfg.batch_size, y), cfg.nrow or nrow
    if cfg.mode == "interpolate" and INTERPOLATE in model.capabilities:
        # A VQ-VAE's codes are discrete, with nothing between two of them: it interpolates the encoder's
        # continuous outputs between pairs of test images instead, quantising every step.
        rows = max(1, cfg.n // STEPS)
        x = draw_test_images(cfg, ckpt, 2 * rows, g)[0]
        t = torch.linspace(0, 1, STEPS)
        return torch.cat([model.interpolate(a.to(device), b.to(device), t.to(device)).cpu()
                          for a, b in zip(x[:rows].split(cfg.batch_size), x[rows:].split(cfg.batch_size))]), STEPS
    if cfg.mode == "interpolate":
        rows = max(1, cfg.n // STEPS)
        a, b = model.noise(rows, generator=g), model.noise(rows, generator=g)
        shape = a.shape[1:]  # a vector, or a VAE's latent grid: interpolated as one flat vector
        z = slerp(a.flatten(1)[:, None], b.flatten(1)[:, None], torch.linspace(0, 1, STEPS)[None, :, None])
        z = z.reshape(rows * STEPS, *shape)
        y = None
        if model.num_classes:  # one class along each row
            y = torch.full((rows,), label) if label is not None else torch.arange(rows) % model.num_classes
            y = y.repeat_interleave(STEPS)
        return generate(model, z, device, cfg.batch_size, y), STEPS
    x, y = draw_test_images(cfg, ckpt, cfg.n, g)
    y = y.to(device) if model.num_classes else None  # a conditional VAE reads the class too
    bs = cfg.batch_size
    recon = torch.cat([model.reconstruct(x[i:i + bs].to(device), None if y is None else y[i:i + bs]).cpu()
                       for i in range(0, len(x), bs)])
    # Rows of inputs, each followed by the row of their reconstructions.
    nrow = cfg.nrow or 8
    pairs = [torch.cat([xi, ri]) for xi, ri in zip(x.split(nrow), recon.split(nrow))]
    return torch.cat(pairs), nrow


@hydra.main(config_path=str(config_dir()), config_name="sample", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    check("sample", cfg)
    device = pick_device(cfg.device, key="device")
    model, ckpt = checkpoint.load_model(cfg.ckpt, device, cfg.ema)
    # out=: a folder of single PNGs when it ends in /, is a folder already, or has no extension; else one grid.
    text = str(cfg.out or "")
    out = Path(text).expanduser() if cfg.out is not None else \
        checkpoint.run_dir_of(ckpt.path) / "samples" / f"{ckpt.path.stem}_{cfg.mode}_seed{cfg.seed}.png"
    folder = text.endswith("/") or out.is_dir() or (cfg.out is not None and not out.suffix)
    if folder and out.exists() and not out.is_dir():
        raise GentrainError(f"out={text} asks for a folder of single PNGs, and {out} is a file")
    if not folder:
        image_format(out)  # an image extension, checked before the work
    files.check_writable(out, folder)
    check_mode(cfg, model, ckpt)  # before a fitted prior is kept in the checkpoint
    if cfg.prior != "gaussian":
        print(f"prior={cfg.prior}: " + priors.use(model, ckpt, cfg.prior, cfg.prior_components, device,
                                                  cfg.data_root, cfg.batch_size))
    images, nrow = images_for(cfg, model, ckpt, device)
    reference = None
    if images.ndim == 2:  # a toy model's points: one scatter plot over the dataset's test points
        if folder:
            raise GentrainError("2-D points are drawn as one scatter plot; give out=FILE.png, not a folder")
        reference = data.load(ckpt.dataset_config(), split="test").images[:len(images)]
    if folder:  # one PNG per image, e.g. for FID tools
        save_pngs(images, out)
        print(f"wrote {len(images)} images to {out}/")
    else:
        save_grid(images, out, nrow, reference)
        what = {"grid": "a grid", "interpolate": "an interpolation grid", "reconstruct": "a reconstruction grid"}
        print(f"wrote {'a scatter plot' if reference is not None else what[cfg.mode]} of {len(images)} "
              f"{'points' if reference is not None else 'images'} to {out}")
