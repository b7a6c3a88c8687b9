"""`gentrain eval ckpt=PATH`: the Evaluator's scores of a checkpoint (or of real test images, the floor),
printed as a table and written to eval.json."""

import json
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gentrain import checkpoint, data, files, priors
from gentrain.config import check, config_dir
from gentrain.device import pick_device, pick_precision, use_tf32
from gentrain.errors import GentrainError, reported
from gentrain.metrics.evaluator import Evaluator


def table(result: dict) -> str:
    lines = [f"{k:<24} {v:.6g}" if isinstance(v, float) else f"{k:<24} {v}" for k, v in result["metrics"].items()]
    lines += [f"{k:<24} skipped: {why}" for k, why in result["skipped"].items()]
    head = [f"{result['what']}, n={result['n']}, seed={result['seed']}"]
    head += [f"{name}: {text}" for name, text in result["spaces"].items()]
    return "\n".join(head + [f"{'metric':<24} value"] + lines)


@hydra.main(config_path=str(config_dir()), config_name="eval", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    check("eval", cfg)
    device = pick_device(cfg.device, key="device")
    use_tf32(device, cfg.precision)  # before anything runs on it, a fitted prior included
    if cfg.ckpt is not None and cfg.get("dataset") is not None:
        raise GentrainError("a checkpoint brings its own dataset: drop dataset= (dataset.root=PATH points at its files "
                            "elsewhere), or drop ckpt= to score the real data")
    if cfg.ckpt is not None:
        model, ckpt = checkpoint.load_model(cfg.ckpt, device, cfg.ema)
        dataset_cfg, capabilities = ckpt.dataset_config(cfg.data_root), model.capabilities
        what = ckpt.describe()
        out = Path(str(cfg.out)).expanduser() if cfg.out else ckpt.path.parent / "eval.json"
    elif cfg.get("dataset") is not None:  # the floor: real test images scored as if they were samples
        model, ckpt, dataset_cfg, capabilities = None, None, cfg.dataset.copy(), None
        if cfg.data_root is not None:
            dataset_cfg.root = cfg.data_root
        what = f"real {dataset_cfg.name} test images"
        out = Path(str(cfg.out)).expanduser() if cfg.out else Path(f"eval-{dataset_cfg.name}-test.json")
    else:
        raise GentrainError("set ckpt=PATH (a checkpoint or run folder), or dataset=NAME for the real-data floor")
    files.check_writable(out)
    evaluator = Evaluator(cfg.metrics, dataset_cfg, capabilities, cfg.n, cfg.seed, device,
                          amp=pick_precision(cfg.precision, device, key="precision"), batch_size=cfg.batch_size)
    if not evaluator.compute:
        raise GentrainError("nothing to compute: " + "; ".join(f"{m} {why}" for m, why in evaluator.skipped.items()))
    prior = None  # fitted once every check has passed: a fitted prior is kept in the checkpoint
    if model is not None and cfg.prior != "gaussian":
        prior = priors.use(model, ckpt, cfg.prior, cfg.prior_components, device, cfg.data_root, cfg.batch_size)
        print(f"prior={cfg.prior}: {prior}")
    if model is None:
        test = data.load(dataset_cfg, split="test").images
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        metrics = evaluator.score_images(test[order[:cfg.n]])
    else:
        metrics = evaluator(model)
    result = {"what": what, "ckpt": None if ckpt is None else str(ckpt.path),
              "family": None if ckpt is None else ckpt.family, "step": None if ckpt is None else ckpt.step,
              "dataset": dataset_cfg.name, "n": cfg.n, "seed": cfg.seed, "spaces": evaluator.describe(),
              **({"prior": {"kind": cfg.prior, "components": cfg.prior_components, "what": prior}} if prior else {}),
              "metrics": metrics, "skipped": evaluator.skipped}
    if "distortion" in metrics:
        result["nll_setup"] = {**({"k": cfg.metrics.k} if "nll" in metrics else {}),
                               "test_images": len(evaluator.test_images), **model.protocol()}
    print(table(result))
    replaced = _earlier(out)
    files.write_text(out, json.dumps(result, indent=2) + "\n", note="the table above has the numbers")
    print(f"wrote {out}" + (f" (replacing the earlier one, {replaced}; out=FILE.json keeps both)" if replaced else ""))


def _earlier(out: Path) -> str | None:
    """What an eval.json about to be replaced held, in a few words (None when there is none)."""
    if not out.is_file():
        return None
    try:
        old = json.loads(out.read_text())
        return f"step {old['step']}, n={old['n']}" if old.get("step") is not None else f"n={old['n']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "unreadable"
