"""The mode-collapse benchmarks, printed as markdown tables beside the published numbers.

Toy (the default): a matrix of GAN losses and regularisers on ring8 and grid25, 5 seeds each, scored as
VEEGAN and PacGAN do (modes covered, share of high-quality samples, on 2,500 samples).
Stacked MNIST (--benchmark stacked): 1,000 modes; each row trained for --minutes of CPU time per seed, then
`gentrain eval ... n=26000 metrics=[modes]` (VEEGAN's protocol: modes covered by 26,000 samples, and the
KL of their mode histogram to uniform).

    python scripts/mode_collapse.py                      # the toy table of docs/stability.md (all rows, 5 seeds)
    python scripts/mode_collapse.py --rows plain,best --seeds 2 --steps 1000   # a quick look
    python scripts/mode_collapse.py --benchmark stacked --minutes 4 --seeds 3 --json stacked.json

Each toy run is `gentrain experiment=toy dataset=... seed=S <row overrides>` with an evaluation at its last
step (trainer.eval_every); runs go --jobs at a time, one CPU thread each (tiny MLPs run fastest that way).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Row name -> overrides on top of experiment=toy (gentrain's best default for the toy data).
ROWS = {
    "plain": ["model.ema=0", "optim.lr=2e-4", "optim.betas=[0.5,0.999]"],
    "wgan_gp": ["model.loss=wgan_gp", "model.ema=0", "model.d_steps=5", "optim.lr=1e-4", "optim.betas=[0.0,0.9]"],
    "hinge_sn": ["model.loss=hinge", "model.sn=true", "model.ema=0"],
    "ns_r1": ["model.r1=0.1", "model.ema=0"],
    "ns_r1_ema": ["model.r1=0.1"],
    "best": [],
}
DESCRIPTION = {
    "plain": "plain GAN: non-saturating loss, DCGAN's optimizer Adam(2e-4, betas 0.5/0.999)",
    "wgan_gp": "WGAN-GP, 5 critic steps, Adam(1e-4, betas 0/0.9)",
    "hinge_sn": "hinge loss + spectral norm",
    "ns_r1": "non-saturating + R1 (gamma 0.1)",
    "ns_r1_ema": "non-saturating + R1 + EMA of G",
    "best": "**non-saturating + EMA of G (0.999): `experiment=toy`**",
}
# Stacked MNIST rows: overrides on top of `dataset=stacked_mnist` (after them, so the dataset stays).
STACKED = {
    "default": [],
    "default_rpgan": ["model.loss=rpgan", "model.r2=0.1"],
    "r3gan": ["experiment=r3gan"],
    "r3gan_gamma01": ["experiment=r3gan", "model.r1=0.1", "model.r2=0.1"],
    "dcgan": ["baseline=dcgan_mnist"],
}
STACKED_DESCRIPTION = {
    "default": "today's default GAN (`model=gan`: DCGAN nets, hinge, lazy R1, EMA)",
    "default_rpgan": "the default with RpGAN + R1 + R2 (`model.loss=rpgan model.r2=0.1`)",
    "r3gan": "`experiment=r3gan`: R3GAN's nets (ch=16), RpGAN + R1 + R2 (γ = 1), Adam(8e-4, β = (0, 0.99))",
    "r3gan_gamma01": "the same with γ = 0.1 for R1 and R2 (`model.r1=0.1 model.r2=0.1`)",
    "dcgan": "plain DCGAN (`baseline=dcgan_mnist`: non-saturating loss, Adam(2e-4, β = (0.5, 0.999)))",
}
# Modes covered (of 1,000) and KL: VEEGAN (Srivastava et al. 2017, Table 2), PacGAN (Lin et al. 2018, Table 2,
# mean of 10 runs), R3GAN (Huang et al. 2024, Table 3 and, for its loss alone, Table 1).
STACKED_PUBLISHED = [("DCGAN (VEEGAN, Table 2)", "99", "3.40"),
                     ("VEEGAN (VEEGAN, Table 2)", "150", "2.95"),
                     ("DCGAN, PacGAN's implementation (PacGAN, Table 2)", "78.9", "4.50"),
                     ("PacDCGAN2 (PacGAN, Table 2)", "1000", "0.06"),
                     ("WGAN-GP (R3GAN, Table 3)", "959", "0.73"),
                     ("StyleGAN2 (R3GAN, Table 3)", "940", "0.42"),
                     ("GAN + R1 + R2, StyleGAN2's nets (R3GAN, Table 1)", "693", "0.927"),
                     ("RpGAN + R1 + R2, StyleGAN2's nets (R3GAN, Table 1)", "1000", "0.078"),
                     ("R3GAN, Config E (R3GAN, Table 3)", "1000", "0.029")]
# VEEGAN (Srivastava et al. 2017, Table 1) and PacGAN (Lin et al. 2018, Table 2): modes, % high quality.
PUBLISHED = [("GAN (VEEGAN paper)", "1 / 99.3%", "3.3 / 0.5%"),
             ("Unrolled GAN (VEEGAN paper)", "7.6 / 35.6%", ""),
             ("VEEGAN", "8 / 52.9%", "24.6 / 40%"),
             ("PacGAN4 (PacGAN paper)", "", "24.8 modes")]


def run_one(row: str, dataset: str, seed: int, steps: int | None, out: Path) -> dict:
    run = out / f"{row}-{dataset}-{seed}"
    args = [sys.executable, "-m", "gentrain", "experiment=toy", f"dataset={dataset}", f"seed={seed}",
            "trainer.device=cpu", f"hydra.run.dir={run}", *ROWS[row]]
    if steps:
        args += [f"trainer.steps={steps}", f"trainer.eval_every={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[2:])} failed:\n{proc.stderr}")
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/modes" in r]
    return {"row": row, "dataset": dataset, "seed": seed, "modes": evals[-1]["eval/modes"],
            "hq": evals[-1]["eval/hq"], "seconds": time.perf_counter() - started}


def run_stacked(row: str, seed: int, minutes: float, out: Path) -> dict:
    """One Stacked MNIST run of `minutes` of training time, then its modes and KL on 26,000 samples."""
    run = out / f"stacked-{row}-{seed}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    train = [*STACKED[row], "dataset=stacked_mnist", f"seed={seed}", "trainer.device=cpu", f"hydra.run.dir={run}",
             f"trainer.max_minutes={minutes}", "trainer.steps=100000000", "trainer.sample_every=100000000",
             "trainer.ckpt_every=1000", "trainer.loggers=[jsonl]"]
    result = run / "eval-modes.json"
    for args in (train, ["eval", f"ckpt={run}", "n=26000", "metrics=[modes]", "device=cpu", f"out={result}"]):
        if args is train and (run / "checkpoints" / "last.pt").exists():
            continue  # trained by an earlier call: score it again
        proc = subprocess.run([sys.executable, "-m", "gentrain", *args], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gentrain {' '.join(args)} failed:\n{proc.stderr}")
    r = json.loads(result.read_text())
    return {"row": row, "seed": seed, "minutes": minutes, "step": r["step"], "modes": r["metrics"]["modes"],
            "kl": r["metrics"]["mode_kl"]}


def stacked_table(results: list[dict], rows: list[str]) -> None:
    print("| setting | modes (of 1,000) | KL | steps |")
    print("|---|---|---|---|")
    for row in rows:
        rs = [r for r in results if r["row"] == row]
        modes, kl = [r["modes"] for r in rs], [r["kl"] for r in rs]
        print(f"| {STACKED_DESCRIPTION[row]} | {statistics.mean(modes):.0f} ({min(modes)}-{max(modes)}) | "
              f"{statistics.mean(kl):.2f} ({min(kl):.2f}-{max(kl):.2f}) | "
              f"{statistics.mean(r['step'] for r in rs):,.0f} |")
    for name, modes, kl in STACKED_PUBLISHED:
        print(f"| {name}, published | {modes} | {kl} | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", choices=("toy", "stacked"), default="toy")
    parser.add_argument("--rows", default=None, help=f"comma-separated, from {', '.join(ROWS)} (toy) or "
                        f"{', '.join(STACKED)} (stacked); default: all")
    parser.add_argument("--minutes", type=float, default=4, help="stacked: training minutes per run")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's trainer.steps")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's scores here")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a --json file")
    args = parser.parse_args()
    if args.benchmark == "stacked":
        rows = args.rows.split(",") if args.rows else list(STACKED)
        if args.table:
            results = json.loads(args.table.read_text())
        else:
            out = args.out or Path(tempfile.mkdtemp(prefix="stacked-mnist-"))
            jobs = [(r, s) for s in range(args.seeds) for r in rows]
            with ThreadPoolExecutor(args.jobs) as pool:
                results = list(pool.map(lambda j: run_stacked(*j, args.minutes, out), jobs))
            if args.json:
                args.json.write_text(json.dumps(results, indent=1) + "\n")
        seeds = sorted({r["seed"] for r in results})
        print(f"\nseeds {', '.join(map(str, seeds))}, {results[0]['minutes']:g} training minutes each; mean (range)\n")
        stacked_table(results, rows)
        return
    rows = args.rows.split(",") if args.rows else list(ROWS)
    if args.table:
        results = json.loads(args.table.read_text())
        out = f"(scores read from {args.table})"
    else:
        out = args.out or Path(tempfile.mkdtemp(prefix="mode-collapse-"))
        jobs = [(r, d, s) for r in rows for d in ("ring8", "grid25") for s in range(args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda j: run_one(*j, args.steps, out), jobs))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    def cell(row, dataset):
        rs = [r for r in results if r["row"] == row and r["dataset"] == dataset]
        modes, hq = [r["modes"] for r in rs], [100 * r["hq"] for r in rs]
        return f"{statistics.mean(modes):.1f} / {statistics.mean(hq):.1f}% (min {min(modes)} / {min(hq):.1f}%)"

    print(f"\n{args.seeds} seeds per cell, mean (and worst seed) of modes covered / high-quality samples; "
          f"run folders in {out}\n")
    print("| setting | ring8: modes (of 8) / HQ | grid25: modes (of 25) / HQ | s per run |")
    print("|---|---|---|---|")
    for row in rows:
        secs = statistics.median(r["seconds"] for r in results if r["row"] == row)
        print(f"| {DESCRIPTION[row]} | {cell(row, 'ring8')} | {cell(row, 'grid25')} | {secs:.0f} |")
    for name, ring, grid in PUBLISHED:
        print(f"| {name}, published | {ring} | {grid} | |")


if __name__ == "__main__":
    main()
