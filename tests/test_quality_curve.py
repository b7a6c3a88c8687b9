"""scripts/quality_curve.py at a tiny budget: two configs, one seed, two step budgets and two minute
budgets, scored by `gentrain eval`; its JSON, markdown table and plot."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_the_quality_curve_trains_scores_and_draws_two_configs(tmp_path, data_root, metrics_cache):
    cache, _ = metrics_cache
    out = tmp_path / "curve"
    small = "trainer.batch_size=16 model.ch=16 trainer.log_every=2"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "quality_curve.py"), "--dataset", "mnist",
                           "--config", f"gan=model=gan {small}", "--config", f"vae=model=vae {small}",
                           "--steps", "2", "4", "--minutes", "0.003", "0.006", "--seeds", "0", "--n", "100",
                           "--eval-args", f"metrics.cache_dir={cache}", "metrics.nll_n=10", "metrics.k=4",
                           "--out", str(out)],
                          env={**os.environ, "GENTRAIN_DATA": str(data_root)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((out / "curve.json").read_text())
    budgets = {(p["config"], p["budget"], p["step"] if p["budget"] == "steps" else p["minutes_budget"])
               for p in result["points"]}
    assert budgets == {(c, "steps", s) for c in ("gan", "vae") for s in (2, 4)} | \
        {(c, "minutes", m) for c in ("gan", "vae") for m in (0.003, 0.006)}
    for p in result["points"]:
        assert p["fid@classifier"] > 0 and 0 <= p["recall@classifier"] <= 1 and p["minutes"] > 0
        assert ("nll" in p) == (p["config"] == "vae")
        if p["budget"] == "minutes":  # stopped by trainer.max_minutes, resumed to the next budget
            assert p["minutes"] >= p["minutes_budget"]
    minutes = sorted((p["minutes_budget"], p["step"]) for p in result["points"] if p["config"] == "gan" and p["budget"] == "minutes")
    assert minutes[0][1] < minutes[1][1]
    table = (out / "curve.md").read_text()
    assert "| gan | 2 steps | 2 |" in table and "| vae | 0.006 min |" in table
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A longer curve goes on from the shorter one's run: its checkpoints and their scores stay as they were.
    kept = out / "runs" / "gan-seed0" / "checkpoints" / "step_0000004.pt"
    before = kept.stat().st_mtime_ns
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "quality_curve.py"), "--dataset", "mnist",
                           "--config", f"gan=model=gan {small}", "--steps", "2", "4", "6", "--seeds", "0",
                           "--n", "100", "--eval-args", f"metrics.cache_dir={cache}", "--out", str(out)],
                          env={**os.environ, "GENTRAIN_DATA": str(data_root)}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert kept.stat().st_mtime_ns == before
    steps = sorted(p["step"] for p in json.loads((out / "curve.json").read_text())["points"])
    assert steps == [2, 4, 6]
    assert "from step 4 to 6" in (out / "train.log").read_text()
