"""Rate-distortion curves of gentrain's learned codecs against PNG, JPEG and WebP on a dataset's test split:
bits per pixel against PSNR and SSIM, one JSON file, one markdown table and one PNG plot.

    python scripts/rate_distortion.py --dataset fashion_mnist --data-root DIR --n 1000 \\
        --ckpt runs/codec/vqvae_k8 runs/codec/vqvae_k32 ... --out docs/rd

Every rate is bits per pixel of the test images (a 28 px greyscale image has 784 pixels):
- PNG (lossless), JPEG and WebP (lossy, a sweep of Pillow's quality), each two ways: one file per image,
  headers included (what storing them costs), and all images tiled into one large image (the headers
  shared, as a learned codec's file shares its own);
- a VQ-VAE checkpoint: the size of the .gtc file `gentrain encode` writes (its header included), decoded
  back by `gentrain decode`: a real file, read back bit-exactly;
- a VAE checkpoint: its posterior mean rounded to a grid (per dimension, --delta times its mean posterior
  std; the inactive dimensions left at 0), priced at the ideal code length under the prior N(0, I), the
  sum of -log2 P(bin) (an arithmetic coder's length, within a few bits; no file is written), and decoded
  from the rounded mean. One point per --delta.
Distortion is per image and averaged: PSNR on 8-bit pixels (MSE floored at 1e-10), and SSIM (Wang et al.
2004) with a 7-pixel window, pytorch-msssim's; MS-SSIM needs images above 160 px and is left out.
"""

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.v2.functional import pil_to_tensor, to_pil_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
from gentrain import checkpoint, data  # noqa: E402
from gentrain.images import pyplot, to_signed, to_uint8  # noqa: E402

QUALITIES = {"JPEG": [5, 10, 20, 30, 50, 75, 90], "WebP": [0, 5, 10, 25, 50, 75, 90]}
DELTAS = [0.5, 1.0, 2.0, 4.0]
TICKS = [0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10]


def distortion(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Mean per-image PSNR (dB) and SSIM of uint8 images y against x, both (N, C, H, W)."""
    from pytorch_msssim import ssim

    x, y = x.double(), y.double()
    mse = (x - y).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return {"psnr": (10 * torch.log10(255 ** 2 / mse)).mean().item(),
            "ssim": ssim(x, y, data_range=255, size_average=False, win_size=7).mean().item()}


def pillow(images: torch.Tensor, fmt: str, **options) -> tuple[int, torch.Tensor]:
    """Bytes of each image as its own file, and the images read back."""
    sizes, back = 0, []
    for img in images:
        buf = io.BytesIO()
        to_pil_image(img).save(buf, format=fmt, **options)
        sizes += buf.tell()
        back.append(pil_to_tensor(Image.open(buf).convert("L" if img.shape[0] == 1 else "RGB")))
    return sizes, torch.stack(back)


def tiled(images: torch.Tensor, fmt: str, **options) -> tuple[int, torch.Tensor]:
    """Bytes of all images tiled into one image (rows of `cols`), and the images cut back out of it."""
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i, img in enumerate(images):
        sheet[:, i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = img
    size, back = pillow(sheet[None], fmt, **options)
    return size, torch.stack([back[0, :, i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w]
                              for i in range(n)])


def classic(images: torch.Tensor) -> list[dict]:
    """PNG, and JPEG and WebP at each quality, one file per image and tiled."""
    pixels = images[0, 0].numel() * len(images)
    points = []
    for layout, code in (("per image", pillow), ("tiled", tiled)):
        size, back = code(images, "PNG", optimize=True)
        assert torch.equal(back, images)
        points.append({"codec": f"PNG, {layout}", "setting": "lossless", "bpp": size * 8 / pixels,
                       "psnr": math.inf, "ssim": 1.0})
        for fmt, qualities in QUALITIES.items():
            for q in qualities:
                size, back = code(images, fmt.upper(), quality=q, **({"method": 6} if fmt == "WebP" else {}))
                points.append({"codec": f"{fmt}, {layout}", "setting": f"quality {q}", "bpp": size * 8 / pixels,
                               **distortion(images, back)})
    return points


def gentrain(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "gentrain", *map(str, args)], check=True, capture_output=True,
                          text=True).stdout


def vqvae(ckpt: Path, images: torch.Tensor, args, work: Path) -> dict:
    """The .gtc file of the first n test images and what `gentrain decode` reads back from it, in a fresh
    folder under `work`."""
    work = Path(tempfile.mkdtemp(dir=work))
    gtc, out = work / "codes.gtc", work / "decoded"
    gentrain("encode", f"ckpt={ckpt}", "input=test", f"n={len(images)}", f"out={gtc}", f"data_root={args.data_root}",
             f"device={args.device}")
    gentrain("decode", f"input={gtc}", f"out={out}/", f"device={args.device}")
    back = torch.stack([pil_to_tensor(Image.open(p)) for p in sorted(out.glob("*.png"))])
    return {"bpp": gtc.stat().st_size * 8 / images[:, 0].numel(), **distortion(images, back)}


@torch.no_grad()
def vae(model, images: torch.Tensor, deltas: list[float], device) -> list[dict]:
    """The posterior mean rounded, priced under N(0, I) and decoded, for each relative step in `deltas`.

    Dimension i is rounded to multiples of delta * s_i, s_i its posterior std averaged over the images (the
    resolution the encoder itself claims), and only the active ones are coded: Var_x(mu_i) > 0.01 (Burda et
    al. 2016); the others are sent as the prior's mean, 0, for free. s and the mask are the codec's own
    parameters, 2 numbers per dimension, left out of the rate."""
    normal = torch.distributions.Normal(0.0, 1.0)
    mu, std = [], []
    for batch in images.split(500):
        m, logvar = model.encode(to_signed(batch.to(device)))
        mu.append(m.double().cpu())
        std.append((0.5 * logvar).exp().double().cpu())
    mu, std = torch.cat(mu), torch.cat(std).mean(0)
    active = mu.var(0) > 0.01
    points = []
    for delta in deltas:
        step = delta * std
        q = torch.where(active, torch.round(mu / step) * step, 0.0)
        p_bin = normal.cdf(q + step / 2) - normal.cdf(q - step / 2)
        bits = -torch.log2(p_bin.clamp(min=1e-300))[:, active].sum().item()
        back = torch.cat([to_uint8(model.decode_codes(z.float().to(device))).cpu() for z in q.split(500)])
        points.append({"setting": f"delta={delta} x std, {int(active.sum())} active dims, ideal length",
                       "bpp": bits / images[:, 0].numel(), **distortion(images, back)})
    return points


def learned(ckpts: list[Path], images: torch.Tensor, args) -> list[dict]:
    points, device = [], torch.device(args.device if args.device != "auto" else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        for path in ckpts:
            model, ckpt = checkpoint.load_model(checkpoint.resolve(path), device)
            name = args.names.get(str(path), Path(path).name)
            if ckpt.family == "vqvae":
                points.append({"codec": f"VQ-VAE {name}", "setting": f"K={model.num_codes}, .gtc file",
                               **vqvae(ckpt.path, images, args, Path(tmp))})
            elif ckpt.family == "vae":
                points += [{"codec": f"VAE {name}", **p} for p in vae(model, images, args.delta, device)]
            else:
                raise SystemExit(f"{path} is a {ckpt.family} checkpoint; give VAE or VQ-VAE checkpoints")
    return points


def table(points: list[dict]) -> str:
    lines = ["| codec | setting | bits/pixel | PSNR (dB) | SSIM |", "| --- | --- | ---: | ---: | ---: |"]
    for p in points:
        psnr = "lossless" if math.isinf(p["psnr"]) else f"{p['psnr']:.2f}"
        lines.append(f"| {p['codec']} | {p['setting']} | {p['bpp']:.3f} | {psnr} | {p['ssim']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(points: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for codec in dict.fromkeys(p["codec"] for p in points):
            line = sorted((p for p in points if p["codec"] == codec and math.isfinite(p[key])), key=lambda p: p["bpp"])
            if codec.startswith("PNG"):
                bpp = next(p["bpp"] for p in points if p["codec"] == codec)
                ax.axvline(bpp, ls=":", color="grey" if "tiled" in codec else "black", label=f"{codec} (lossless)")
                continue
            style = "--" if "per image" in codec else "-"
            marker = "s" if codec.startswith("VQ") else "o" if codec.startswith("VAE") else "."
            ax.plot([p["bpp"] for p in line], [p[key] for p in line], style, marker=marker, label=codec)
        ax.set_xscale("log")
        ax.set_xticks(TICKS, [f"{t:g}" for t in TICKS])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("bits per pixel (log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--n", type=int, default=1000, help="the first n test images")
    parser.add_argument("--ckpt", nargs="*", default=[], help="VAE or VQ-VAE checkpoints or run folders")
    parser.add_argument("--name", nargs="*", default=[], help="a label per --ckpt (default: its folder's name)")
    parser.add_argument("--delta", type=float, nargs="*", default=DELTAS, help="a VAE's rounding steps, in posterior stds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="rd", help="folder for rd.json, rd.md and rd.png")
    args = parser.parse_args(argv)
    args.names = dict(zip(args.ckpt, args.name))
    cfg = OmegaConf.create({"name": args.dataset, "root": args.data_root, "image_size": 28})
    images = data.load(cfg, "test").images[:args.n]
    points = classic(images) + learned(args.ckpt, images, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rd.json").write_text(json.dumps({"dataset": args.dataset, "n": len(images), "points": points}, indent=1))
    (out / "rd.md").write_text(table(points))
    plot(points, out / "rd.png", f"{args.dataset} test, first {len(images)} images")
    print(table(points), end="")
    print(f"wrote {out / 'rd.json'}, {out / 'rd.md'} and {out / 'rd.png'}")


if __name__ == "__main__":
    main()
