"""`gentrain classifier dataset=NAME`: train (or show) the cached domain classifier of a dataset, the
feature space of metrics.features=classifier."""

import hydra
from omegaconf import DictConfig

from gentrain.config import check, config_dir
from gentrain.device import pick_device
from gentrain.errors import reported
from gentrain.metrics.classifier import ensure
from gentrain.metrics.evaluator import cache_dir_for


@hydra.main(config_path=str(config_dir()), config_name="classifier", version_base="1.3")
@reported
def main(cfg: DictConfig) -> None:
    """`gentrain classifier dataset=NAME`: train (or show) the cached classifier of a dataset."""
    check("classifier", cfg)
    device = pick_device(cfg.device, key="device")
    cache = cache_dir_for(cfg.metrics, cfg.dataset)
    _, info, path = ensure(cfg.dataset, cache, device, retrain=cfg.retrain, epochs=cfg.epochs,
                           batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)
    print(f"{info['dataset']} {info['image_size']}px classifier: test accuracy {100 * info['test_accuracy']:.2f}% "
          f"(trained in {info['seconds']:.0f} s); {path}")
