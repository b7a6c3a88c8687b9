"""Every config composes, and the value checks reject what would fail later."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gentrain import GentrainError
from gentrain.config import check_train, config_dir

CONFIGS = config_dir()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_train(*overrides):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("group", ["model", "dataset", "optim", "optim/scheduler", "trainer", "baseline",
                                   "experiment", "hparams_search"])
def test_every_option_of_every_group_composes(group):
    assert options(group), f"configs/{group} is empty"
    for choice in options(group):
        folder = (group, choice) == ("dataset", "folder") or \
            "override /dataset: folder" in (CONFIGS / group / f"{choice}.yaml").read_text()
        cfg = compose_train(f"{group}={choice}", *(["dataset.root=/some/images"] if folder else []))
        check_train(cfg)
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_cluster_configs_compose_with_their_plugins():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        slurm = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4"], return_hydra_config=True)
        optuna = compose("train", overrides=["hparams_search=optuna", "trainer.steps=50"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 4  # a job asks for the GPUs its run trains on
    assert optuna.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert optuna.trainer.eval_every == 50 and optuna.hydra.sweeper.direction == "minimize"


def test_each_family_picks_its_own_optimizer_defaults():
    assert compose_train("model=gan").optim.betas == [0.5, 0.99]
    vae = compose_train("model=vae")
    assert vae.optim.lr == 1e-3 and vae.optim.betas == [0.9, 0.999]
    assert compose_train("model=vae", "optim=adamw").optim._target_ == "torch.optim.AdamW"


def test_experiment_presets_and_baselines_set_their_family():
    vae = compose_train("experiment=vae_mnist")
    assert vae.model.family == "vae" and vae.optim.lr == 1e-3  # the family's optimizer follows the preset
    dcgan = compose_train("baseline=dcgan_mnist")
    assert dcgan.model.family == "gan" and dcgan.optim.lr == 2e-4 and dcgan.model.loss == "ns"
    assert dcgan.optim.betas == [0.5, 0.999] and dcgan.model.ema == 0  # DCGAN's own optimizer, not the default's
    # the command line has the last word over a baseline, and a preset over a baseline, as in Hydra's defaults
    assert compose_train("baseline=dcgan_mnist", "trainer.steps=7").trainer.steps == 7
    assert compose_train("baseline=dcgan_mnist", "experiment=smoke").trainer.steps == 300


def test_sample_config_composes():
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=x.pt"])
    assert cfg.n == 64 and cfg.mode == "grid"


def test_data_root_defaults_to_user_cache_and_follows_env(monkeypatch):
    monkeypatch.delenv("GENTRAIN_DATA", raising=False)
    assert compose_train().dataset.root == "~/.cache/gentrain/data"
    monkeypatch.setenv("GENTRAIN_DATA", "/data/here")
    assert compose_train().dataset.root == "/data/here"


@pytest.mark.parametrize("override, message", [
    ("optim.lr=0", "optim.lr must be a positive number"),
    ("optim.lr=-1e-4", "optim.lr must be a positive number"),
    ("trainer.batch_size=0", "trainer.batch_size must be a positive integer"),
    ("trainer.steps=0", "trainer.steps must be a positive integer"),
    ("trainer.steps=2.5", "trainer.steps must be a positive integer"),
    ("dataset.image_size=48", "dataset.image_size must be one of 16, 28, 32, 64, 128, 256, 512"),
    ("trainer.precision=fp8", "trainer.precision must be one of"),
    ("trainer.device=tpu", "trainer.device must be one of"),
    ("optim._target_=os.system", "optim._target_ must name a torch.optim optimizer"),
    ("optim/scheduler=linear optim.scheduler._target_=os.system",
     "optim.scheduler._target_ must name a torch.optim.lr_scheduler schedule"),
    ("optim/scheduler=linear optim.scheduler._target_=torch.optim.lr_scheduler.ReduceLROnPlateau",
     "schedule that steps on its own"),
    ("optim/scheduler=linear optim.scheduler.total_iters=0", "optim.scheduler.total_iters must be a positive integer"),
    ("optim/scheduler=linear +optim.scheduler.gamma=0.5", "optim.scheduler.gamma is not a key of gentrain; did you mean"),
])
def test_bad_values_are_rejected(override, message):
    with pytest.raises(GentrainError, match=message):
        check_train(compose_train(*override.split()))


def test_every_optimizer_keeps_a_constant_learning_rate_unless_asked():
    for optim in options("optim"):
        assert "scheduler" not in compose_train(f"optim={optim}").optim
    for family in ("gan", "vae", "vqvae"):
        cfg = compose_train(f"model={family}", "optim/scheduler=cosine", "trainer.steps=300")
        assert cfg.optim.scheduler.T_max == 300 and cfg.optim._target_ == "torch.optim.Adam"


def test_configs_ship_beside_the_package_or_in_the_checkout():
    assert (config_dir() / "train.yaml").is_file()
    assert config_dir() in (Path(__file__).resolve().parents[1] / "configs",
                            Path(__import__("gentrain").__file__).parent / "configs")
