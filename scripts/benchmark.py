"""Training throughput of gentrain's loop against a classic eager PyTorch loop, side by side in one process,
for docs/performance.md.

    python scripts/benchmark.py                        # every row; on the GPU when there is one
    python scripts/benchmark.py --rows dcgan64_b64 --variants default uncaptured compile
    python scripts/benchmark.py --quick                # small sizes on the CPU in seconds (the test suite runs it)

Each row trains the same networks two ways:
- reference: the classic eager loop, as the PyTorch examples write it (dcgan/main.py, vae/main.py): a
  torchvision DataLoader with 2 workers and PIL transforms (Resize, ToTensor, Normalize), fp32, non-fused
  Adam, and a host sync for every logged number of every step (.item());
- gentrain: `gentrain.commands.train.run` itself, the loop a `gentrain` command runs, with the row's settings and
  each variant's switches (default: the defaults, on a GPU bf16, channels_last and the step captured as
  a CUDA graph; uncaptured: trainer.cuda_graphs=false; compile: trainer.compile=true, captured on a GPU;
  compile-uncaptured: both).
Images/s is the median over `--windows` timed windows of `--window` steps each, after one window of
warm-up (data loading, cuDNN autotuning, compilation, graph capture): for gentrain its log intervals
(trainer.log_every = window), whose ends wait for the device. TFLOP/s is images/s times the FLOPs one
training image costs, counted by torch.utils.flop_counter on one step of each implementation (matrix
multiplies and convolutions, forward and backward; the rest is small beside them).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from hydra import compose, initialize_config_dir
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
from gentrain import models  # noqa: E402
from gentrain.commands import train  # noqa: E402
from gentrain.config import config_dir  # noqa: E402
from gentrain.device import pick_device  # noqa: E402

# name -> gentrain overrides of the row; the reference takes the same dataset, size, batch and networks
ROWS = {
    "dcgan64_b64": ["model=gan", "dataset=fashion_mnist", "dataset.image_size=64", "trainer.batch_size=64"],
    "dcgan64_b1024": ["model=gan", "dataset=fashion_mnist", "dataset.image_size=64", "trainer.batch_size=1024"],
    "gan28": ["model=gan", "dataset=mnist"],  # the defaults: `gentrain model=gan dataset=mnist`, batch 128
    "vae28": ["model=vae", "dataset=mnist"],
    # Your own images (--folder): the lightweight GAN (experiment=folder_128), gentrain alone (the classic
    # examples have no such model); FLOPs per image show what a step costs.
    "light128_b32": ["experiment=folder_128", "dataset.image_size=128", "trainer.batch_size=32"],
    "light256_b8": ["experiment=folder_128", "dataset.image_size=256", "trainer.batch_size=8"],
}
FOLDER_ROWS = ("light128_b32", "light256_b8")
VARIANTS = {"default": [], "uncaptured": ["trainer.cuda_graphs=false"], "compile": ["trainer.compile=true"],
            "compile-uncaptured": ["trainer.compile=true", "trainer.cuda_graphs=false"]}
QUICK = ["trainer.batch_size=16", "model.ch=16"]  # --quick: CPU-sized rows


def config(overrides: list[str]):
    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="benchmark"):
        return compose("train", overrides=overrides)


def classic_loader(cfg, device):
    """The classic input pipeline: PIL images through torchvision transforms in 2 DataLoader workers."""
    tf = [transforms.Resize(cfg.dataset.image_size)] if cfg.dataset.image_size != 28 else []
    tf += [transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))]
    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}[cfg.dataset.name]
    ds = cls(str(cfg.dataset.root), train=True, download=False, transform=transforms.Compose(tf))
    return torch.utils.data.DataLoader(ds, batch_size=cfg.trainer.batch_size, shuffle=True, num_workers=2,
                                       drop_last=True, pin_memory=device.type == "cuda")


def classic_step(model, device):
    """One training step as the PyTorch examples write it, with gentrain's networks.

    GAN (dcgan/main.py): D on a real batch and on G's fakes, then G through D on the same fakes; binary
    cross-entropy with 1/0 labels; D(x), D(G(z)) and both losses read with .item(). VAE (vae/main.py): the
    negative ELBO, backward, step, and the loss read with .item()."""
    if hasattr(model, "D"):
        opt_d = torch.optim.Adam(model.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_g = torch.optim.Adam(model.G.parameters(), lr=2e-4, betas=(0.5, 0.999))

        def step(real):
            b = real.size(0)
            ones, zeros = torch.ones(b, device=device), torch.zeros(b, device=device)
            model.D.zero_grad()
            out = model.D(real).view(-1)
            err_real = F.binary_cross_entropy_with_logits(out, ones)
            err_real.backward()
            d_x = out.sigmoid().mean().item()
            fake = torch.tanh(model.G(torch.randn(b, model.z_dim, device=device)))
            out = model.D(fake.detach()).view(-1)
            err_fake = F.binary_cross_entropy_with_logits(out, zeros)
            err_fake.backward()
            d_g_z1 = out.sigmoid().mean().item()
            opt_d.step()
            model.G.zero_grad()
            out = model.D(fake).view(-1)
            err_g = F.binary_cross_entropy_with_logits(out, ones)
            err_g.backward()
            d_g_z2 = out.sigmoid().mean().item()
            opt_g.step()
            return (err_real + err_fake).item(), err_g.item(), d_x, d_g_z1, d_g_z2
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(real):
            opt.zero_grad()
            loss, _ = model.loss("vae", real, None, 0)
            loss.backward()
            opt.step()
            return loss.item()
    return step


def windows(step, batches, window: int, count: int, device) -> list[float]:
    """Images/s of `count` timed windows of `window` steps, after one untimed window."""
    rates, images, start = [], 0, None
    for i in range(window * (count + 1)):
        x = next(batches)
        step(x)
        images += len(x)
        if (i + 1) % window == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if start is not None:
                rates.append(images / (now - start))
            start, images = now, 0
    return rates


def forever(loader, device):
    while True:
        for x, _ in loader:
            yield x.to(device, non_blocking=True)


def flops_per_image(run_step, x) -> float:
    with FlopCounterMode(display=False) as counter:
        run_step(x)
    return counter.get_total_flops() / len(x)


def gentrain_flops(cfg, device) -> float:
    """FLOPs per training image of one gentrain step: every phase's loss, forward and backward, but for the
    lazy regularisers' phase (Dreg, one step in 16 for the default's R1): torch's FLOP counter cannot follow
    the autograd.grad of a gradient penalty."""
    size, channels = cfg.dataset.image_size, cfg.dataset.get("channels", 1)
    model = models.build(cfg.model, channels, size).to(device).train()
    x = torch.rand(8, channels, size, size, device=device) * 2 - 1

    def step(x):
        carry = {}  # what a phase hands a later one (the fakes G's phase reuses), as loop.Step passes it
        for phase in model.phases:
            if phase.every == 1:
                model.loss(phase.name, x, None, 0, carry)[0].backward()
    return flops_per_image(step, x)


def run_gentrain(cfg, device) -> list[float]:
    """Images/s of the loop's log intervals after the first."""
    with tempfile.TemporaryDirectory() as tmp:
        train.run(cfg, Path(tmp), device, None)
        records = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    return [r["img_per_s"] for r in records if "img_per_s" in r][1:]  # the first interval is the warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=None, choices=list(ROWS),
                    help="default: all (--quick: one DCGAN-64 row, the batch being 16 for both)")
    ap.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS),
                    help="gentrain variants (default: all of them on CUDA, default on CPU)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--window", type=int, default=50, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (after one of warm-up)")
    ap.add_argument("--quick", action="store_true", help="batch 16, ch 16, 2 windows of 2 steps: a smoke test")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--folder", help="an image folder for the 128 and 256 px rows (e.g. the emoji of ../shared/data); "
                                     "without it those rows are left out")
    ap.add_argument("overrides", nargs="*", help="gentrain overrides for every row, e.g. dataset.root=PATH")
    a = ap.parse_args()
    device = pick_device(a.device)
    if a.quick:
        a.window, a.windows = 2, 2
    rows = a.rows or [r for r in ROWS if not (a.quick and (r == "dcgan64_b1024" or r in FOLDER_ROWS))]
    if not a.folder and any(r in FOLDER_ROWS for r in rows):
        print(f"leaving out {', '.join(r for r in rows if r in FOLDER_ROWS)}: they need --folder", file=sys.stderr)
        rows = [r for r in rows if r not in FOLDER_ROWS]
    variants = a.variants or (list(VARIANTS) if device.type == "cuda" else ["default"])
    steps = a.window * (a.windows + 1)
    common = [f"trainer.device={device.type}", f"trainer.steps={steps}", f"trainer.log_every={a.window}",
              f"trainer.sample_every={steps}", f"trainer.ckpt_every={steps}", *(QUICK if a.quick else []), *a.overrides]
    results = []
    for name in rows:
        folder = [f"dataset.root={a.folder}"] if name in FOLDER_ROWS else []
        base = config([*ROWS[name], *common, *folder])
        flops = {"gentrain": gentrain_flops(base, device)}
        if name not in FOLDER_ROWS:
            torch.manual_seed(0)
            model = models.build(base.model, 1, base.dataset.image_size).to(device).train()
            ref_step = classic_step(model, device)
            loader = classic_loader(base, device)
            flops["reference"] = flops_per_image(ref_step, next(forever(loader, device))[:8])
            rates = windows(ref_step, forever(loader, device), a.window, a.windows, device)
            del loader
            results.append({"row": name, "impl": "reference", "batch": base.trainer.batch_size,
                            "img_per_s": statistics.median(rates), "windows": rates, "flop_per_img": flops["reference"]})
            print(f"{name} reference: {results[-1]['img_per_s']:.0f} img/s", file=sys.stderr, flush=True)
        for variant in variants:
            cfg = config([*ROWS[name], *common, *folder, *VARIANTS[variant]])
            rates = run_gentrain(cfg, device)
            results.append({"row": name, "impl": f"gentrain {variant}", "batch": cfg.trainer.batch_size,
                            "img_per_s": statistics.median(rates), "windows": rates, "flop_per_img": flops["gentrain"]})
            print(f"{name} gentrain {variant}: {results[-1]['img_per_s']:.0f} img/s", file=sys.stderr, flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}; median of {a.windows} windows of {a.window} steps\n")
    print("| row | implementation | batch | img/s | GFLOP/img | TFLOP/s | vs reference |\n|---|---|---|---|---|---|---|")
    for r in results:
        ref = next((x for x in results if x["row"] == r["row"] and x["impl"] == "reference"), None)
        ratio = "-" if ref is None else f"{r['img_per_s'] / ref['img_per_s']:.2f}x"
        print(f"| {r['row']} | {r['impl']} | {r['batch']} | {r['img_per_s']:,.0f} | {r['flop_per_img'] / 1e9:.3f} | "
              f"{r['img_per_s'] * r['flop_per_img'] / 1e12:.3f} | {ratio} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
