"""The `gentrain` command, the top of the package: picks the verb, checks the overrides, and turns user
errors into one line. Each verb is a module of gentrain.commands:

    gentrain [overrides]             train (commands/train.py)
    gentrain sample ckpt=PATH ...    draw images from a checkpoint (commands/sample.py)
    gentrain eval ckpt=PATH ...      sample-quality and likelihood metrics (commands/eval.py)
    gentrain encode ckpt=PATH input=DIR|test out=codes.pt   images to codes (commands/codec.py)
    gentrain decode ckpt=PATH input=codes.pt out=DIR/       codes to images (commands/codec.py)
    gentrain classifier dataset=...  the domain classifier behind the metrics (commands/classifier.py)
    gentrain plot RUN_DIR            losses and metrics over steps as a PNG (commands/plot.py)
    gentrain doctor                  what gentrain does on this machine, and whether it works (commands/doctor.py)

Hydra parses everything after the verb, so `-m` sweeps, `--help` and `--cfg job` work for each.
"""

import re
import sys
from pathlib import Path

from gentrain.errors import GentrainError, fail, quote

VERBS = ("train", "sample", "eval", "encode", "decode", "classifier", "plot", "doctor")


def _one_line(e: Exception) -> str:
    from hydra.errors import MissingConfigException

    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        from gentrain.config import config_dir

        group, _, choice = e.missing_cfg_file.rpartition("/")
        plugins = ' (Hydra\'s launcher and sweeper plugins: pip install "gentrain[cluster]")' \
            if group in ("hydra/launcher", "hydra/sweeper") else ""
        elsewhere = {"experiment": "baseline", "baseline": "experiment"}.get(group)
        if elsewhere and (config_dir() / elsewhere / f"{choice}.yaml").is_file():
            return f"{group}={choice} is not an option; {choice} is in configs/{elsewhere}: {elsewhere}={choice}"
        return f"{group}={choice} is not an option; choose from {', '.join(sorted(e.options))}{plugins}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        lines.append(str(cause).strip().splitlines()[0])
    return "; ".join(ln.rstrip(".") for ln in lines[:5])


def check_overrides(verb: str, args: list[str]) -> str | None:
    """Compose the config of every job the command line asks for before Hydra runs any of them, so a
    bad override (unknown group option, misspelt key, bad value) is one clear line and nothing runs.
    Returns the first job's run folder, as Hydra would name it now."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from gentrain.config import check, check_train, config_dir

    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return None  # Hydra's own flags (--help, --cfg, ...): Hydra handles those
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        # Continuous ranges (interval(...), tag(log, ...)) are for a sweeper such as Optuna to pick from:
        # the jobs checked here take every discrete choice and the base value of those keys.
        parsed = [o for o in parsed if not o.is_sweep_override() or o.is_discrete_sweep()]
        jobs = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
        run_dir = None
        with initialize_config_dir(str(config_dir()), version_base="1.3", job_name=verb):
            for i, job in enumerate(jobs):
                cfg = compose(verb, overrides=job, return_hydra_config=i == 0)
                if i == 0:
                    run_dir = str(cfg.hydra.run.dir)
                    if multirun:
                        _check_launcher(str(cfg.hydra.launcher.get("_target_", "")))
                if verb == "train" and not cfg.resume:
                    check_train(cfg)
                else:
                    check(verb, cfg)
        return run_dir
    except GentrainError as e:
        fail(str(e))
    except (ValueError, TypeError):  # a config group given something else than names (trainer=5, model=[1])
        named = lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v)
        group = next((o for o in parsed if _is_group(o.key_or_group) and not named(o.value())), None)
        if group is None:
            raise
        fail(f"{group.key_or_group}={group.value()} is not an option; choose from "
             f"{', '.join(_options(group.key_or_group))} (a config group takes the name of one of its configs)")
    except (HydraException, OmegaConfBaseException) as e:  # Hydra's composition and parse errors
        key = re.search(r"Could not override '([^']+)'", str(e))
        if key:  # a misspelt key: the nearest known ones, never Hydra's advice to append it with +
            from gentrain.config import unknown

            fail(str(unknown(key.group(1), verb, _keys(verb, [o for o in overrides if not o.startswith(key.group(1))]))))
        fail(_one_line(e))


def _is_group(name: str) -> bool:
    from gentrain.config import config_dir

    return bool(name) and (config_dir() / name).is_dir()


def _options(group: str) -> list[str]:
    from gentrain.config import config_dir

    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _keys(verb: str, overrides: list[str]) -> list[str]:
    """Every key of the verb's config as these overrides compose it (none where they do not compose)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import DictConfig

    from gentrain.config import config_dir

    def flat(node, prefix=""):
        for k, v in node.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, DictConfig) else [f"{prefix}{k}"]

    try:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            return list(flat(compose(verb, overrides=overrides)))
    except Exception:
        return []


def _check_launcher(target: str) -> None:
    import shutil

    if target.endswith("SlurmLauncher") and shutil.which("sbatch") is None:
        raise GentrainError("hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on this "
                            "machine's PATH; run the command on the cluster's login node")


def _resume_dir(args: list[str]) -> tuple[str, bool] | None:
    """The folder a resumed run continues in, and whether it is the run's own (whose .hydra/ Hydra must leave
    as it is): its own folder, unless it branches from an earlier checkpoint into a new folder
    (checkpoint.branches: None, Hydra names it) or hydra.run.dir says where."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gentrain import checkpoint

    parse = lambda a: OverridesParser.create().parse_override(a).value()
    value = next((parse(a) for a in args if a.startswith("resume=")), None)
    if not value:  # no resume=, or resume=null
        return None
    rollback = next((parse(a) for a in args if a.startswith("rollback=")), False) is True
    given = next((parse(a) for a in args if a.startswith("hydra.run.dir=")), None)
    try:
        path = checkpoint.resolve(value)
        home = checkpoint.run_dir_of(path)
        if given is not None:  # the run's own folder given again keeps its .hydra/ as the run's own record
            return str(given), Path(str(given)).expanduser().resolve() == home.resolve()
        if checkpoint.branches(path, rollback):
            return None
        return str(home), True
    except GentrainError as e:
        fail(str(e))


def _metrics_list(args: list[str]) -> list[str]:
    """`metrics=[fid,pr]` is shorthand for `metrics.compute=[fid,pr]` (the metrics node also holds settings)."""
    return [f"metrics.compute={a[len('metrics='):]}" if a.startswith("metrics=[") else a for a in args]


def _data_root(verb: str, args: list[str]) -> list[str]:
    """`dataset.root=PATH` names where a dataset is for every verb: for sample, encode and eval of a
    checkpoint, which brings its own dataset, it is their `data_root=` (an alias kept)."""
    if verb in ("sample", "encode") or (verb == "eval" and not any(a.startswith("dataset=") for a in args)):
        return [f"data_root={a[len('dataset.root='):]}" if a.startswith("dataset.root=") else a for a in args]
    return args


TESTED = "torch==2.14.1 torchvision==0.29.2"  # the pair the suite runs with (.ci/run installs it)


def _check_torchvision() -> None:
    """A torchvision built for another torch fails in its import (e.g. "operator torchvision::nms does not
    exist"), which gentrain's own imports would turn into a long traceback: one line with both versions and
    the install command that fixes it instead."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # RuntimeError (its compiled operators), ImportError or OSError (their library)
        from importlib import metadata

        def version(name):
            try:
                return metadata.version(name)
            except metadata.PackageNotFoundError:
                return "(not installed)"

        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"torchvision {version('torchvision')} does not work with torch {version('torch')} ({why}); install a "
             f"matching pair: pip install {TESTED} (CPU-only: add --index-url https://download.pytorch.org/whl/cpu)")


def main(argv: list[str] | None = None) -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Started with Ctrl-C ignored (inherited from the parent): the training loop takes SIGINT over for a
        # clean stop anyway, so Ctrl-C before it works the same way, as a KeyboardInterrupt.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C before the loop took it over (importing torch, loading data)
        fail("interrupted (checkpoints already written are intact)", 130)


def parse(args: list[str]) -> tuple[str, list[str]]:
    """The verb, and its overrides as Hydra reads them (the shorthands and aliases spelt out)."""
    verb = args[0] if args and args[0] in VERBS else "train"
    args = args[1:] if args and args[0] in VERBS else list(args)
    if verb in ("plot", "doctor"):
        return verb, args
    args = _data_root(verb, _metrics_list(args))
    if verb in ("sample", "eval", "encode") and args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"ckpt={quote(args[0])}"  # gentrain sample RUN_DIR, as gentrain plot RUN_DIR
    return verb, args


def _main(args: list[str]) -> None:
    verb, args = parse(args)
    if verb == "plot":
        from gentrain.commands.plot import main as plot

        return plot(args)
    _check_torchvision()
    if verb == "doctor":
        from gentrain.commands.doctor import main as doctor

        return doctor(args)
    run_dir = check_overrides(verb, args)
    from gentrain import dist, files

    # One training run started here (not a sweep, not one of torchrun's workers): its folder is known now.
    single = verb == "train" and not {"-m", "--multirun"} & set(args) and run_dir is not None and not dist.launched()
    if single and (resumed := _resume_dir(args)):
        run_dir, own = resumed
        if own:
            if not any(a.startswith("hydra.run.dir=") for a in args):
                args.append(f"hydra.run.dir={quote(run_dir)}")
            args.append("hydra.output_subdir=null")
    elif single and not any(a.startswith("hydra.run.dir=") for a in args):
        args.append(f"hydra.run.dir={quote(run_dir)}")  # the folder locked below is the one Hydra writes
    if dist.rank() > 0:
        # torchrun's other workers: rank 0 picks the run folder and writes every file (gentrain.dist)
        args += ["hydra.output_subdir=null", "hydra/job_logging=none", "hydra/hydra_logging=none",
                 *([] if any(a.startswith("hydra.run.dir=") for a in args) else ["hydra.run.dir=."])]
    sys.argv = [f"gentrain {verb}" if verb != "train" else "gentrain", *args]
    if verb == "sample":
        from gentrain.commands.sample import main as task
    elif verb == "eval":
        from gentrain.commands.eval import main as task
    elif verb == "encode":
        from gentrain.commands.codec import encode as task
    elif verb == "decode":
        from gentrain.commands.codec import decode as task
    elif verb == "classifier":
        from gentrain.commands.classifier import main as task
    else:
        from gentrain.commands.train import main as task
    if single:  # one run at a time in a folder; a failed start leaves nothing behind
        try:
            with files.run_folder(Path(run_dir).expanduser()):
                task()
        except GentrainError as e:
            fail(str(e))
    else:
        task()
