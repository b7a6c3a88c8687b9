"""`gentrain sample ckpt=PATH`: images from a checkpoint alone, rebuilt from the config stored in it."""

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torchvision.transforms.v2.functional import to_pil_image

from gentrain import GentrainError, checkpoint, data, models
from gentrain.cli import reported
from gentrain.config import config_dir
from gentrain.loop import pick_device, save_grid

MODES = ("grid", "interpolate", "reconstruct")
STEPS = 10  # images per interpolation row


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985; for GAN latents White 2016): Gaussian codes concentrate
    near a sphere of radius sqrt(z_dim), and a straight line between two of them cuts inside it."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def load_model(path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    ckpt = checkpoint.load(path)
    model = models.build(ckpt["config"]["model"], ckpt["data"]["channels"], ckpt["data"]["image_size"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError:
        raise GentrainError(f"{path}: the stored weights do not fit the stored model config") from None
    return model.to(device).eval(), ckpt


@torch.no_grad()
def generate(model, z: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """model.sample over the codes z, batch_size at a time on `device`; images in [-1, 1] on the CPU."""
    return torch.cat([model.sample(zb.to(device)).cpu() for zb in z.split(batch_size)])


@torch.no_grad()
def images_for(cfg: DictConfig, model, ckpt: dict, device) -> tuple[torch.Tensor, int | None]:
    """The images the chosen mode asks for, in [-1, 1], and the grid's row length."""
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.mode == "grid":
        return generate(model, model.noise(cfg.n, generator=g), device, cfg.batch_size), cfg.nrow
    if cfg.mode == "interpolate":
        rows = max(1, cfg.n // STEPS)
        a, b = model.noise(rows, generator=g)[:, None], model.noise(rows, generator=g)[:, None]
        z = slerp(a, b, torch.linspace(0, 1, STEPS)[None, :, None]).reshape(rows * STEPS, -1)
        return generate(model, z, device, cfg.batch_size), STEPS
    if not hasattr(model, "reconstruct"):
        raise GentrainError(f"mode=reconstruct needs a VAE checkpoint; this one is a {ckpt['family']}")
    dataset_cfg = OmegaConf.create(ckpt["config"]["dataset"])
    if cfg.data_root is not None:
        dataset_cfg.root = cfg.data_root
    test = data.load(dataset_cfg, split="test")
    pick = torch.randperm(len(test.images), generator=g)[:cfg.n]
    x = data.to_signed(test.images[pick])
    recon = torch.cat([model.reconstruct(xb.to(device)).cpu() for xb in x.split(cfg.batch_size)])
    # Rows of inputs, each followed by the row of their reconstructions.
    nrow = cfg.nrow or 8
    pairs = [torch.cat([xi, ri]) for xi, ri in zip(x.split(nrow), recon.split(nrow))]
    return torch.cat(pairs), nrow


@hydra.main(config_path=str(config_dir()), config_name="sample", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    if cfg.mode not in MODES:
        raise GentrainError(f"mode={cfg.mode} is not a sampling mode; choose from {', '.join(MODES)}")
    if isinstance(cfg.n, bool) or not isinstance(cfg.n, int) or cfg.n < 1 or cfg.batch_size < 1:
        raise GentrainError(f"n and batch_size must be positive integers, got n={cfg.n}, batch_size={cfg.batch_size}")
    device = pick_device(cfg.device, key="device")
    path = checkpoint.resolve(cfg.ckpt)
    model, ckpt = load_model(path, device)
    images, nrow = images_for(cfg, model, ckpt, device)

    out = cfg.out
    if out is None:
        out = checkpoint.run_dir_of(path) / "samples" / f"{path.stem}_{cfg.mode}_seed{cfg.seed}.png"
    out = Path(str(out)).expanduser()
    if str(cfg.out or "").endswith("/") or out.is_dir():
        out.mkdir(parents=True, exist_ok=True)  # one PNG per image, e.g. for FID tools
        for i, img in enumerate(data.to_uint8(images)):
            to_pil_image(img).save(out / f"{i:06d}.png")  # greyscale data stays single-channel
        print(f"wrote {len(images)} images to {out}/")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, out, nrow)
        print(f"wrote {cfg.mode} grid ({len(images)} images) to {out}")
