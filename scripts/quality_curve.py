"""Sample quality per step and per minute of training: configs trained on one dataset over seeds, each
checkpoint scored by `gentrain eval` (FID, precision and recall in the dataset classifier's features; a
VAE's NLL), written as a JSON file, a markdown table and a plot (FID against steps and against training
minutes, one line per config, the seeds' spread shaded).

    python scripts/quality_curve.py --dataset fashion_mnist \
        --config default="model=gan" --config hinge="baseline=hinge_sn_fashion" \
        --steps 1000 2000 5000 --minutes 1 3 --seeds 0 1 2 --out curves/fashion_gan
    python scripts/quality_curve.py --dataset fashion_mnist --config vae="model=vae" \
        --steps 2000 5000 --priors gaussian gmm --out curves/fashion_vae

Step budgets: one run per config and seed to the largest budget, keeping a checkpoint at each
(trainer.keep_every; a later curve with a larger budget resumes that run); each checkpoint's training
time (which excludes evaluation) places it on the minutes axis too. Minute budgets: one run per config
and seed stopped by trainer.max_minutes at each budget in turn and resumed to the next, so equal minutes
compare configs at equal cost. Runs go --jobs at a time with one CPU thread each (two at a time on a
2-core machine, as scripts/mode_collapse.py).
`--priors gaussian gmm` scores a VAE's checkpoints with each sampling prior (`prior=gmm`: the Gaussian
mixture fitted to its posterior means); the NLL does not depend on it and is scored once.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SCORES = ("fid@classifier", "precision@classifier", "recall@classifier", "nll")


def gentrain(args: list[str], log: Path) -> None:
    """`python -m gentrain ARGS` on one CPU thread, its output in `log`; a failure stops the curve."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "gentrain", *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"gentrain {' '.join(args)} failed; see {log}")


def train_steps(name: str, overrides: list[str], seed: int, steps: list[int], a, out: Path) -> list[dict]:
    """One run to the largest step budget, a checkpoint kept at each; the checkpoints to score."""
    run = out / "runs" / f"{name}-seed{seed}"
    keep = math.gcd(*steps)
    kept = lambda s: run / "checkpoints" / f"step_{s:07d}.pt"
    every = [f"trainer.steps={max(steps)}", f"trainer.keep_every={keep}", f"trainer.ckpt_every={keep}",
             f"trainer.sample_every={max(steps)}"]
    if not kept(max(steps)).exists():
        last = run / "checkpoints" / "last.pt"
        done = torch.load(last, map_location="cpu", weights_only=True)["step"] if last.exists() else 0
        if done and all(kept(s).exists() for s in steps if s <= done):  # a shorter curve's run: go on from it
            gentrain([f"resume={run}", *every], out / "train.log")  # (a resume continues as one run would)
        else:
            shutil.rmtree(run, ignore_errors=True)
            gentrain([*overrides, f"dataset={a.dataset}", f"seed={seed}", f"trainer.device={a.device}",
                      *every, "trainer.loggers=[jsonl]", f"hydra.run.dir={run}", *a.train_args], out / "train.log")
    return [{"config": name, "seed": seed, "budget": "steps", "ckpt": str(kept(s))} for s in steps]


def train_minutes(name: str, overrides: list[str], seed: int, minutes: list[float], a, out: Path) -> list[dict]:
    """One run stopped at each minute budget in turn (trainer.max_minutes counts training time across
    resumes), its checkpoint kept there; the checkpoints to score."""
    run = out / "runs" / f"{name}-seed{seed}-minutes"
    kept = [run / "checkpoints" / f"minutes_{m:g}.pt" for m in minutes]
    if not kept[-1].exists():
        shutil.rmtree(run, ignore_errors=True)
        for i, (m, path) in enumerate(zip(minutes, kept)):
            common = [f"trainer.max_minutes={m}", "trainer.steps=100000000", "trainer.ckpt_every=500",
                      "trainer.keep_every=0", "trainer.sample_every=100000000"]
            if i == 0:
                gentrain([*overrides, f"dataset={a.dataset}", f"seed={seed}", f"trainer.device={a.device}",
                          "trainer.loggers=[jsonl]", f"hydra.run.dir={run}", *common, *a.train_args], out / "train.log")
            else:
                gentrain([f"resume={run}", *common], out / "train.log")
            shutil.copyfile(run / "checkpoints" / "last.pt", path)
    return [{"config": name, "seed": seed, "budget": "minutes", "minutes_budget": m, "ckpt": str(p)}
            for m, p in zip(minutes, kept)]


def score(point: dict, prior: str, vae: bool, a, out: Path) -> dict:
    """`gentrain eval` of one checkpoint with one sampling prior: its scores, step and training minutes."""
    ckpt = Path(point["ckpt"])
    result = ckpt.with_name(f"{ckpt.stem}.eval-{prior}-n{a.n}.json")
    if not result.exists():
        metrics = "[fid,pr,nll]" if vae and prior == "gaussian" and a.nll else "[fid,pr]"
        gentrain(["eval", f"ckpt={ckpt}", f"n={a.n}", f"metrics={metrics}", f"device={a.device}",
                  *([f"prior={prior}"] if vae else []), f"out={result}", *a.eval_args], out / "eval.log")
    r = json.loads(result.read_text())
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    name = point["config"] + (f"+{prior}" if vae and len(a.priors) > 1 else "")
    return {**point, "config": name, "prior": prior if vae else None, "step": state["step"],
            "minutes": state["seconds"] / 60, **{k: r["metrics"][k] for k in SCORES if k in r["metrics"]}}


def summary(points: list[dict]) -> list[dict]:
    """Per config and budget: mean and spread (min, max) over seeds of every score, and the mean step
    and minutes."""
    groups = {}
    for p in points:
        budget = p["step"] if p["budget"] == "steps" else p["minutes_budget"]
        groups.setdefault((p["config"], p["budget"], budget), []).append(p)
    out = []
    for (config, kind, budget), ps in groups.items():
        row = {"config": config, "budget": kind, "at": budget, "seeds": len(ps),
               "step": statistics.mean(p["step"] for p in ps), "minutes": statistics.mean(p["minutes"] for p in ps)}
        for k in SCORES:
            vals = [p[k] for p in ps if k in p]
            if vals:
                row[k] = {"mean": statistics.mean(vals), "min": min(vals), "max": max(vals)}
        out.append(row)
    return sorted(out, key=lambda r: (r["budget"], r["config"], r["at"]))


def table(rows: list[dict]) -> str:
    cell = lambda r, k, f: (f"{r[k]['mean']:{f}} ({r[k]['min']:{f}}-{r[k]['max']:{f}})" if k in r else "")
    lines = ["| config | budget | step | training min | FID | precision | recall | NLL (nats) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = f"{r['at']} steps" if r["budget"] == "steps" else f"{r['at']:g} min"
        lines.append(f"| {r['config']} | {budget} | {r['step']:.0f} | {r['minutes']:.1f} | {cell(r, 'fid@classifier', '.1f')} | "
                     f"{cell(r, 'precision@classifier', '.2f')} | {cell(r, 'recall@classifier', '.2f')} | "
                     f"{cell(r, 'nll', '.1f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    configs = sorted({r["config"] for r in rows})
    for ax, (x, label) in zip(axes, (("step", "training steps"), ("minutes", "training minutes"))):
        for i, config in enumerate(configs):
            # steps: the step budgets' points; minutes: every point of the config, by its training time
            rs = sorted((r for r in rows if r["config"] == config and "fid@classifier" in r
                         and (x == "minutes" or r["budget"] == "steps")), key=lambda r: r[x])
            if not rs:
                continue
            xs = [r[x] for r in rs]
            ax.plot(xs, [r["fid@classifier"]["mean"] for r in rs], "o-", color=f"C{i}", label=config)
            ax.fill_between(xs, [r["fid@classifier"]["min"] for r in rs], [r["fid@classifier"]["max"] for r in rs],
                            color=f"C{i}", alpha=0.2)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FID (classifier features; lower is better)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--config", action="append", required=True, metavar="NAME=OVERRIDES",
                    help='a config to train: a name, "=", and gentrain overrides separated by spaces')
    ap.add_argument("--steps", type=int, nargs="*", default=[], help="step budgets")
    ap.add_argument("--minutes", type=float, nargs="*", default=[], help="training-time budgets (trainer.max_minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=10000, help="samples per evaluation")
    ap.add_argument("--priors", nargs="+", default=["gaussian"], help="a VAE's sampling priors to score")
    ap.add_argument("--no-nll", dest="nll", action="store_false", help="leave out a VAE's NLL (its slowest score)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one CPU thread each")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-args", nargs="*", default=[], help="overrides for every training run")
    ap.add_argument("--eval-args", nargs="*", default=[], help="overrides for every gentrain eval")
    ap.add_argument("--out", type=Path, default=Path("quality_curve"))
    a = ap.parse_args(argv)
    if not a.steps and not a.minutes:
        ap.error("give --steps, --minutes or both")
    configs = {}
    for spec in a.config:
        name, sep, overrides = spec.partition("=")
        if not sep or not name:
            ap.error(f"--config {spec!r}: write NAME=OVERRIDES, e.g. default=\"model=gan\"")
        configs[name] = overrides.split()
    a.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    jobs = [(train_steps, name, ov, seed, sorted(a.steps)) for name, ov in configs.items() for seed in a.seeds if a.steps]
    jobs += [(train_minutes, name, ov, seed, sorted(a.minutes)) for name, ov in configs.items() for seed in a.seeds if a.minutes]
    with ThreadPoolExecutor(a.jobs) as pool:
        trained = [p for ps in pool.map(lambda j: j[0](*j[1:], a, a.out), jobs) for p in ps]
        vae = [torch.load(p["ckpt"], map_location="cpu", weights_only=True)["family"] == "vae" for p in trained]
        todo = [(p, prior, is_vae) for p, is_vae in zip(trained, vae) for prior in a.priors
                if prior == "gaussian" or is_vae]
        points = list(pool.map(lambda t: score(*t, a, a.out), todo))

    rows = summary(points)
    title = f"{a.dataset}: {', '.join(configs)}; seeds {', '.join(map(str, a.seeds))}; n={a.n}"
    (a.out / "curve.json").write_text(json.dumps({"dataset": a.dataset, "configs": configs, "seeds": a.seeds,
                                                  "n": a.n, "device": a.device, "torch": torch.__version__,
                                                  "points": points, "summary": rows}, indent=2) + "\n")
    (a.out / "curve.md").write_text(f"{title}\n\n{table(rows)}\n")
    plot(rows, a.out / "curve.png", title)
    print(table(rows))
    print(f"wrote {a.out / 'curve.json'}, {a.out / 'curve.md'} and {a.out / 'curve.png'} "
          f"({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
