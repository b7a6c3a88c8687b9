"""The sample grids at the top of the README: the default GAN and VAE (`model=gan`, `model=vae`, nothing else
changed but the step budget) trained on MNIST and Fashion-MNIST, each run's final grid copied to docs/, and
what made them (command, steps, training seconds, machine, torch, date) written to docs/readme_grids.json.

    python scripts/readme_grids.py --steps 500 --jobs 2          # 4 runs, two at a time, on a CPU
    python scripts/readme_grids.py --steps 10000 --device cuda   # the defaults' whole runs, on a GPU

The grids are the runs' own samples/step_XXXXXXX.png, drawn from the fixed noise batch (a GAN's from its
EMA G). From a checkout without installing: PYTHONPATH=src python scripts/readme_grids.py ...
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10000, help="training steps of each run (default: trainer.steps' default)")
    ap.add_argument("--families", nargs="+", default=["gan", "vae"], help="model families (default: gan vae)")
    ap.add_argument("--datasets", nargs="+", default=["mnist", "fashion_mnist"], help="datasets (default: mnist fashion_mnist)")
    ap.add_argument("--device", default="auto", help="trainer.device (default: auto)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each on one CPU thread when more than 1 (default: 1)")
    ap.add_argument("--runs", default="runs/readme", help="where the runs go (default: runs/readme)")
    ap.add_argument("--docs", default=str(REPO / "docs"), help="where the grids and readme_grids.json go (default: docs/)")
    args = ap.parse_args()

    import torch

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {})}

    def train(family: str, dataset: str) -> dict:
        run = Path(args.runs) / f"{family}-{dataset}"
        if run.exists():
            shutil.rmtree(run)
        overrides = [f"model={family}", f"dataset={dataset}", f"trainer.steps={args.steps}", f"trainer.device={args.device}"]
        subprocess.run([sys.executable, "-m", "gentrain", *overrides, f"hydra.run.dir={run}"], check=True, env=env,
                       stdout=subprocess.DEVNULL)
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        grid = docs / f"grid_{family}_{dataset}.png"
        shutil.copyfile(run / "samples" / f"step_{args.steps:07d}.png", grid)
        print(f"{grid}: gentrain {' '.join(overrides)}, {last['seconds']:.0f} s of training", flush=True)
        return {"grid": grid.name, "command": "gentrain " + " ".join(overrides), "steps": args.steps,
                "training_seconds": round(last["seconds"], 1)}

    with ThreadPoolExecutor(args.jobs) as pool:
        made = list(pool.map(lambda fd: train(*fd), [(f, d) for f in args.families for d in args.datasets]))
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    machine = torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()}-core CPU ({cpu_name()})"
    record = {"command": "python scripts/readme_grids.py " + " ".join(sys.argv[1:]), "machine": machine,
              "torch": torch.__version__, "date": datetime.date.today().isoformat(), "runs": made}
    (docs / "readme_grids.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
