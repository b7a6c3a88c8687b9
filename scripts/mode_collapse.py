"""The toy mode-collapse benchmark: a matrix of GAN losses and regularisers on ring8 and grid25, 5 seeds
each, scored as VEEGAN and PacGAN do (modes covered, share of high-quality samples, on 2,500 samples),
printed as a markdown table beside the published numbers.

    python scripts/mode_collapse.py                      # the table of docs/stability.md (all rows, 5 seeds)
    python scripts/mode_collapse.py --rows plain,best --seeds 2 --steps 1000   # a quick look

Each run is `gentrain experiment=toy dataset=... seed=S <row overrides>` with an evaluation at its last
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, from {', '.join(ROWS)}")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="override the preset's trainer.steps")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's scores here")
    parser.add_argument("--table", type=Path, default=None, help="only print the table of a --json file")
    args = parser.parse_args()
    rows = args.rows.split(",")
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
