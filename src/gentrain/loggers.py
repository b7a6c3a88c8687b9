"""Where a run's numbers and pictures go besides metrics.jsonl (which the loop writes itself, and resumes
from): TensorBoard event files in the run folder by default, Weights & Biases on request
(trainer.loggers). Only rank 0 logs, and only on the steps that log anyway, with numbers already on the host.

    tensorboard --logdir runs        every run folder is a run: losses, img/s, learning rates, eval scores,
                                     the sample grids, and the hyperparameters with the final scores
"""

import hashlib
import logging
import threading
import weakref
from pathlib import Path

from gentrain import files
from gentrain.errors import GentrainError

log = logging.getLogger("gentrain")

LOGGERS = ("jsonl", "tensorboard", "wandb")


def flat(config: dict, prefix: str = "") -> dict:
    """A nested config as {"model.ch": 64, ...}, with the values TensorBoard and W&B take (lists as text)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = "null" if v is None else v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


class TensorBoard:
    """torch's SummaryWriter into the run folder. A resumed run drops the events after its checkpoint's last
    full log interval (purge_step), as metrics.jsonl does."""

    def __init__(self, run_dir: Path, config: dict, start: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GentrainError("trainer.loggers has tensorboard, which needs the tensorboard package: "
                                "pip install tensorboard (or log to metrics.jsonl alone: trainer.loggers=[jsonl])") from None
        self.writer = SummaryWriter(str(run_dir), purge_step=start or None)
        self.config = config

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, step: int, path: Path) -> None:
        from PIL import Image
        from torchvision.transforms.v2.functional import pil_to_tensor

        with Image.open(path) as img:
            self.writer.add_image("samples", pil_to_tensor(img.convert("RGB")), step)

    def close(self, final: dict[str, float]) -> None:
        """The run's hyperparameters beside its final numbers, for TensorBoard's HParams tab."""
        keep = ("model.", "optim.", "dataset.name", "dataset.image_size", "trainer.batch_size", "trainer.steps", "seed")
        hparams = {k: v for k, v in flat(self.config).items() if k.startswith(keep) and not k.endswith("_target_")}
        self.writer.add_hparams(hparams, {f"final/{k}": v for k, v in final.items()}, run_name=".")
        self.writer.close()


class WandB:
    """A Weights & Biases run (pip install wandb; WANDB_MODE=offline logs without an account or network).
    Its id is derived from the run folder, so `resume=` continues the same W&B run."""

    def __init__(self, run_dir: Path, config: dict, start: int, project: str):
        try:
            import wandb
        except ImportError:
            raise GentrainError("trainer.loggers has wandb, which needs the wandb package: pip install wandb "
                                "(WANDB_MODE=offline logs without an account)") from None
        self.wandb = wandb
        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), config=flat(config),
                              name=Path(run_dir).name, settings=wandb.Settings(silent=True))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def image(self, step: int, path: Path) -> None:
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self, final: dict[str, float]) -> None:
        self.run.summary.update({f"final/{k}": v for k, v in final.items()})
        self.run.finish()


_owners = weakref.WeakKeyDictionary()  # a logger's own threads (TensorBoard's writer) -> its _OneLine
_calling = []  # (logger, the threads alive before) while a logger's call runs: a thread it starts may fail at once


def _thread_failed(args) -> None:
    """threading.excepthook: an error in a logger's own thread (TensorBoard writes its event file from one) is
    kept for the logger's next call, which stops the run with one line; other threads' go on as before."""
    owner = _owners.get(args.thread) or next((o for o, before in _calling if args.thread not in before), None)
    if owner is None:
        return _previous_hook(args)
    owner.failed = owner.failed or args.exc_value


_previous_hook = threading.excepthook


class _OneLine:
    """A logger whose failures to write (a full disk) are one GentrainError line, as every other file's,
    also where the failure happens in a thread of the logger's own, which would print a traceback."""

    def __init__(self, name: str, run_dir: Path, make):
        global _previous_hook
        self.name, self.run_dir, self.failed = name, run_dir, None
        if threading.excepthook is not _thread_failed:
            _previous_hook, threading.excepthook = threading.excepthook, _thread_failed
        self.logger = self._call(make)

    def _call(self, fn, *args):
        before = set(threading.enumerate())
        _calling.append((self, before))
        try:
            if self.failed is None:
                return fn(*args)
        except OSError as e:  # TensorBoard also raises here what its writer thread died of
            self.failed = e
        finally:
            for thread in set(threading.enumerate()) - before:  # threads the logger started
                _owners[thread] = self
            _calling.remove((self, before))
        if self.failed is not None:
            raise GentrainError(self._line(self.failed)) from None

    def _line(self, e: BaseException) -> str:
        error = files.os_error(e)
        if error is not None:
            return f"could not write the {self.name} log in {self.run_dir} ({files.cause(error)})"
        first = (str(e).strip().splitlines() or [""])[0]
        return (f"the {self.name} logger's thread failed ({type(e).__name__}: {first}); the checkpoints written "
                f"are intact; log to metrics.jsonl alone with trainer.loggers=[jsonl]")

    def scalars(self, step, values):
        self._call(self.logger.scalars, step, values)

    def image(self, step, path):
        self._call(self.logger.image, step, path)

    def close(self, final):
        self._call(self.logger.close, final)


def build(names, run_dir: Path, config: dict, start: int, project: str = "gentrain") -> list:
    """The loggers trainer.loggers names, besides metrics.jsonl (which is always written)."""
    out = []
    if "tensorboard" in names:
        out.append(_OneLine("TensorBoard", run_dir, lambda: TensorBoard(run_dir, config, start)))
    if "wandb" in names:
        out.append(_OneLine("W&B", run_dir, lambda: WandB(run_dir, config, start, project)))
    return out
