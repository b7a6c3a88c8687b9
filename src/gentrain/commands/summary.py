"""A sweep's summary: when `gentrain -m ...` ends, summary.md and summary.json in the sweep folder, one row per
job: its overrides, how far it got, its training time, its final losses and its evaluation scores.
Hydra calls it (a callback in configs/train.yaml) on whichever launcher ran the jobs."""

import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from gentrain import files
from gentrain.loop import read_record


def job_row(job: Path) -> dict:
    """What a job's folder says about it."""
    overrides = job / ".hydra" / "overrides.yaml"
    row = {"job": job.name, "overrides": list(OmegaConf.load(overrides)) if overrides.is_file() else []}
    lines = (job / "metrics.jsonl").read_text(errors="replace").splitlines() if (job / "metrics.jsonl").is_file() else []
    records = [r for r in map(read_record, lines) if r]
    logged = [r for r in records if "seconds" in r]
    evals = [r for r in records if any(k.startswith("eval/") for k in r)]
    if logged:
        last = logged[-1]
        row |= {"step": last["step"], "seconds": round(last["seconds"], 1),
                "final": {k: v for k, v in last.items() if k not in ("step", "seconds")}}
    if evals:
        row["eval"] = {k[5:]: v for k, v in evals[-1].items() if k.startswith("eval/") and k != "eval/seconds"}
    row["checkpoint"] = str(job / "checkpoints" / "last.pt") if (job / "checkpoints" / "last.pt").is_file() else None
    return row


def table(rows: list[dict]) -> str:
    """The rows as a markdown table: the final losses and eval scores as columns."""
    finals = list(dict.fromkeys(k for r in rows for k in r.get("final", {}) if k != "img_per_s"))
    scores = list(dict.fromkeys(k for r in rows for k in r.get("eval", {})))
    head = ["job", "overrides", "step", "minutes", *finals, *scores]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["job"], " ".join(r["overrides"]) or "-", str(r.get("step", "-")),
                 f"{r['seconds'] / 60:.1f}" if "seconds" in r else "-",
                 *[f"{r['final'][k]:.4g}" if k in r.get("final", {}) else "-" for k in finals],
                 *[f"{r['eval'][k]:.4g}" if k in r.get("eval", {}) else "-" for k in scores]]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def summarize(sweep_dir: Path) -> list[dict]:
    jobs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    rows = [job_row(job) for job in jobs]
    files.write_text(sweep_dir / "summary.json", json.dumps(rows, indent=1) + "\n")
    files.write_text(sweep_dir / "summary.md", table(rows))
    return rows


class Summary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        if sweep_dir.is_dir():
            rows = summarize(sweep_dir)
            print(f"{len(rows)} jobs; summary in {sweep_dir / 'summary.md'} and summary.json")
