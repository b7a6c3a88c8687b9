"""Train the default GAN and VAE on MNIST and Fashion-MNIST, score them with `gentrain eval`, and print
the metrics table of docs/quality.md (markdown), with the real-data floor of each dataset.

    python scripts/metrics_table.py [--steps 3000] [--out runs/metrics_table] [-- extra overrides]

Uses `python -m gentrain`, so it runs from a checkout with PYTHONPATH=src as well as installed.
GENTRAIN_DATA must point at the datasets when they are not in the default root.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

KEYS = ("fid@classifier", "precision@classifier", "recall@classifier", "classes@classifier")


def gentrain(*args: str) -> None:
    print("+ gentrain", " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "gentrain", *args], check=True)


def row(name: str, command: str, seconds: float | None, result: dict) -> str:
    m = result["metrics"]
    time = f"{seconds / 60:.1f} min" if seconds is not None else "-"
    cells = [f"{m[k]:.2f}" if isinstance(m[k], float) else str(m[k]) for k in KEYS]
    nll = f"{m['nll']:.1f}" if "nll" in m else "-"
    return f"| {name} | `{command}` | {time} | " + " | ".join(cells) + f" | {nll} |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--out", default="runs/metrics_table")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    out = Path(a.out)
    rows = []
    for dataset in ("mnist", "fashion_mnist"):
        floor = out / f"floor-{dataset}.json"
        gentrain("eval", f"dataset={dataset}", f"n={a.n}", "metrics=[fid,kid,pr,classes]", f"out={floor}")
        rows.append(row(f"real {dataset} test split (floor)", f"gentrain eval dataset={dataset}", None,
                        json.loads(floor.read_text())))
        for family in ("gan", "vae"):
            run = out / f"{family}-{dataset}"
            train = [f"model={family}", f"dataset={dataset}", f"trainer.steps={a.steps}", *a.overrides]
            if not (run / "checkpoints" / "last.pt").exists():
                gentrain(*train, f"hydra.run.dir={run}")
            lines = (run / "metrics.jsonl").read_text().splitlines()
            seconds = max(json.loads(ln).get("seconds", 0) for ln in lines if ln.strip())
            gentrain("eval", f"ckpt={run}", f"n={a.n}", "metrics.k=100")
            rows.append(row(f"{family} {dataset}", "gentrain " + " ".join(train), seconds,
                            json.loads((run / "checkpoints" / "eval.json").read_text())))
    print("| model | command | training time | FID | precision | recall | classes | NLL (nats, k=100) |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
