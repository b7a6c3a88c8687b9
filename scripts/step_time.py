"""CPU time a training step of two configs, A and B, interleaved in one process so that both meet the same
machine load: rounds of --steps steps of A then B (B then A every other round), each config's phases as the
loop runs them (a lazy phase on its own steps), one batch of random images of the dataset's shape.

    python scripts/step_time.py --a model=gan model.r1=0 --b model=gan --rounds 12

prints each config's median milliseconds a step, their ratio, and the median of the rounds' B/A ratios.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # a checkout without an install
from benchmark import config  # noqa: E402
from gentrain import models  # noqa: E402
from gentrain.commands.train import lazy_ratio, optimizer_factory  # noqa: E402
from gentrain.loop import Step  # noqa: E402


def build(overrides: list[str], device: torch.device):
    """The model, its loop Step and one batch of a config, as `gentrain` would train it on `device`."""
    cfg = config(overrides)
    size, channels = cfg.dataset.image_size, cfg.dataset.get("channels", 1)
    torch.manual_seed(0)
    model = models.build(cfg.model, channels, size).to(device).train()
    make = optimizer_factory(cfg.optim, device)
    optimizers = {o: make(o, model.phase_parameters(o), lazy_ratio(model.phases, o)) for o in model.optimizers}
    scalers = {o: torch.amp.GradScaler(device.type, enabled=False) for o in optimizers}
    x = torch.rand(cfg.trainer.batch_size, channels, size, size, device=device) * 2 - 1
    return model, Step(model, optimizers, scalers, device, None), x


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="+", required=True, metavar="OVERRIDE")
    ap.add_argument("--b", nargs="+", required=True, metavar="OVERRIDE")
    ap.add_argument("--rounds", type=int, default=12, help="rounds timed; the first is warm-up and left out")
    ap.add_argument("--steps", type=int, default=16, help="steps a round (16: one lazy R1 phase each)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device("cpu")
    runs = {"A": build(a.a, device), "B": build(a.b, device)}
    seconds = {"A": [], "B": []}
    for r in range(a.rounds):
        for name in ("A", "B") if r % 2 == 0 else ("B", "A"):
            model, step, x = runs[name]
            start = time.perf_counter()
            for i in range(a.steps):
                phases = tuple(p for p in model.phases if i % p.every == 0)
                step(phases, [(x, None)] * len(phases), i)
            seconds[name].append(time.perf_counter() - start)
    ta, tb = seconds["A"][1:], seconds["B"][1:]
    ratios = [b / q for q, b in zip(ta, tb)]
    ms = lambda ts: statistics.median(ts) / a.steps * 1000
    print(f"A {' '.join(a.a)}: {ms(ta):.1f} ms a step\nB {' '.join(a.b)}: {ms(tb):.1f} ms a step\n"
          f"B/A: {ms(tb) / ms(ta):.3f} (medians), {statistics.median(ratios):.3f} (median of {len(ratios)} rounds), "
          f"{a.threads} thread(s), torch {torch.__version__}")


if __name__ == "__main__":
    main()
