"""`gentrain plot RUN_DIR [out=PNG]`: the run's losses and metrics over steps, one panel per group."""

import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from gentrain import files
from gentrain.errors import GentrainError, fail
from gentrain.images import pyplot, save_figure
from gentrain.loop import read_record


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """metrics.jsonl -> {name: (steps, values)} for every numeric key but step and seconds; lines that are
    not records (cut short by a killed write, garbage) are left out with a one-line note."""
    series, skipped = defaultdict(lambda: ([], [])), 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise GentrainError(f"cannot read {path} ({files.cause(e)})") from None
    for line in lines:
        record = read_record(line)
        if record is None:
            skipped += bool(line.strip())
            continue
        for key, value in record.items():
            if key not in ("step", "seconds") and isinstance(value, (int, float)) and math.isfinite(value):
                series[key][0].append(record["step"])
                series[key][1].append(value)
    if not series:
        raise GentrainError(f"{path} has no logged values yet" + (f" ({skipped} line(s) are not metrics records)"
                                                                 if skipped else ""))
    if skipped:
        print(f"gentrain: note: left out {skipped} line(s) of {path} that are not metrics records", file=sys.stderr)
    return dict(series)


# Evaluation scores that share a panel; the rest get one each, as their scales differ.
SHARED = {"precision": "precision / recall", "recall": "precision / recall", "nelbo": "-ELBO / NLL (nats)",
          "nll": "-ELBO / NLL (nats)"}
LEFT_OUT = ("_std", "_bpd", "eval/seconds")  # spreads, the same numbers in other units, timing


def panels(series: dict) -> dict[str, list[str]]:
    """Panel title -> keys: one per network or family (D/loss with D(x) and D(G(z)), G/..., vae/...),
    the evaluation scores, and throughput."""
    groups = defaultdict(list)
    for key in series:
        if key.endswith(LEFT_OUT) or "_std@" in key:
            continue
        if key.startswith("eval/"):
            name, _, space = key[5:].partition("@")
            title = "eval: " + SHARED.get(name, name) + (f" @{space}" if space else "")
        else:
            title = re.split(r"[/(]", key)[0]
        groups[title].append(key)
    return dict(groups)


def plot(run_dir: Path, out: Path) -> Path:
    plt = pyplot()
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise GentrainError(f"no metrics.jsonl in {run_dir}; give a run folder")
    series = read_metrics(path)
    groups = panels(series)
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, groups.items()):
        for key in keys:
            steps, values = series[key]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_figure(fig, out)
    return out


def main(args: list[str]) -> None:
    keys = dict(a.split("=", 1) for a in args if "=" in a)
    positional = [a for a in args if "=" not in a]
    if args and args[0] in ("-h", "--help"):
        print("gentrain plot RUN_DIR [out=FILE.png]: losses and metrics of a run over steps "
              "(default RUN_DIR/metrics.png)")
        return
    run = keys.pop("run", None) or (positional[0] if len(positional) == 1 else None)
    if run is None or keys.keys() - {"out"} or len(positional) > 1:
        fail("usage: gentrain plot RUN_DIR [out=FILE.png]")
    run_dir = Path(run).expanduser()
    try:
        out = plot(run_dir, Path(keys.get("out") or run_dir / "metrics.png").expanduser())
    except GentrainError as e:
        fail(str(e))
    print(f"wrote {out}")
