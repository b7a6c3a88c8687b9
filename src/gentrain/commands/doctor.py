"""`gentrain doctor [device=auto] [seconds=2] [compile=auto] [out=doctor.json]`: what gentrain will do on this
machine, and whether it works here, before a real run finds out.

It reports torch, torchvision, CUDA, cuDNN, the GPU (name, memory, bf16 and TF32 support) and whether the
inductor bug behind trainer.compile's NCHW fallback applies (pytorch/pytorch#171622); then it runs the
default GAN's and the default VAE's training step, as `gentrain model=gan|vae` builds them (on random
MNIST-sized images, so no dataset is needed), a few seconds in each way the defaults may run it: eager,
captured as CUDA graphs with the run-time check (fast.StepGraphs), and compiled. For each: images per
second, and whether its numbers agree with the eager step's. A way the defaults use that fails (capture,
bf16) is one error line naming the switch that avoids it, and a non-zero exit; doctor.json keeps it all.
"""

import json
import platform
import time
from pathlib import Path

import torch

from gentrain import data, fast, files, loop, models
from gentrain.commands.train import lazy_ratio, optimizer_factory
from gentrain.device import pick_device
from gentrain.errors import GentrainError, fail

USAGE = """gentrain doctor [device=auto|cpu|cuda] [seconds=2] [compile=auto|true|false] [out=doctor.json]

Checks what gentrain does on this machine: torch, CUDA, cuDNN and the GPU; then the default GAN's and VAE's
training step (random 28 px images, the default batch) eager, captured as CUDA graphs (with the check the
default trainer.cuda_graphs=auto runs) and compiled, each for about `seconds`, with its img/s and whether it
computes what the eager step does. Writes `out` (doctor.json). Exits non-zero, with one line naming the switch
that avoids it, when something the defaults use is broken here.
  device    where to run the steps (auto: cuda when torch sees one)
  seconds   timing per family and mode, after the warm-up steps
  compile   time trainer.compile=true too (auto: on a GPU; on a CPU its compile takes minutes)
  out       the report's JSON file"""

FAMILIES = {"gan": ["model=gan"], "vae": ["model=vae"]}
IMAGES = (1, 28, 10)  # channels, size and classes of MNIST, the default dataset


def machine(device: torch.device) -> dict:
    """The facts the fast path is decided from (fast.plan)."""
    import torchvision

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
             "device": str(device), "cpu_threads": torch.get_num_threads(),
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
             "gpu": None, "gpu_memory_gib": None, "compute_capability": None, "bf16": None, "tf32": None,
             # trainer.compile on CUDA keeps NCHW where the inductor mispredicts channels_last gradients
             "pytorch_171622_applies": not fast.inductor_knows_nhwc_conv_grads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        facts |= {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2 ** 30, 1),
                  "compute_capability": f"{p.major}.{p.minor}", "bf16": torch.cuda.is_bf16_supported(),
                  "tf32": p.major >= 8}  # TF32 tensor cores: Ampere (8.0) and later
    return facts


def config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from gentrain.config import config_dir

    with initialize_config_dir(str(config_dir()), version_base="1.3", job_name="doctor"):
        return compose("train", overrides=overrides)


def trial(family: str, mode: str, device: torch.device, seconds: float) -> dict:
    """The family's default training step in one mode (eager | captured | compiled) for about `seconds` after
    its warm-up: img/s, the first step's losses, and for a captured step what its check found."""
    switches = {"eager": ["trainer.cuda_graphs=false"], "captured": ["trainer.cuda_graphs=auto"],
                "compiled": ["trainer.compile=true", "trainer.cuda_graphs=false"]}[mode]
    cfg = config([*FAMILIES[family], f"trainer.device={device.type}", *switches])
    t = cfg.trainer
    torch.manual_seed(cfg.seed)
    channels, size, classes = IMAGES
    images = torch.randint(0, 256, (max(4 * t.batch_size, 512), channels, size, size), dtype=torch.uint8)
    train_data = data.ImageData(images, torch.randint(0, classes, (len(images),)), classes)
    model = models.build(cfg.model, channels, size, classes)
    speed = fast.plan(t, device, 1, points=False)
    speed.apply()
    model.to(device, memory_format=torch.channels_last if speed.channels_last else torch.contiguous_format).train()
    if speed.compile:
        fast.compile_networks(model, speed.compile_options)
    make = optimizer_factory(cfg.optim, device, fused=speed.fused, capturable=speed.capturable)
    optimizers = {o: make(o, model.phase_parameters(o), lazy_ratio(model.phases, o)) for o in model.optimizers}
    scalers = {o: torch.amp.GradScaler(device.type, enabled=speed.amp is torch.float16) for o in optimizers}
    batches = data.Batches(train_data, t.batch_size, cfg.seed, device, channels_last=speed.channels_last)
    run_step = loop.stepper(model, optimizers, scalers, speed)
    draws = loop.draws_per_step(model)
    # Warm-up: every set of phases a step runs, past its capture and check (the 4th call of each graph).
    every = max(p.every for p in model.phases)
    warmup = 4 * every if mode == "captured" else 3

    def step(i: int) -> list:
        return run_step(*loop.due(model, batches, i, draws), i)

    first = {f"{name} (phase {j + 1})": float(v) for j, (loss, stats) in enumerate(step(0))
             for name, v in [("loss", loss), *stats.items()]}
    for i in range(1, warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    i, start = warmup, time.perf_counter()
    while True:  # whole steps until `seconds` are up (a step reads nothing back, so sync to time it)
        out = step(i)
        i += 1
        if (i - warmup) % 4 == 0:
            sync()
            if time.perf_counter() - start >= seconds:
                break
    took = time.perf_counter() - start
    last = torch.stack([loss for loss, _ in out]).float()
    result = {"steps": i - warmup, "img_per_s": round((i - warmup) * t.batch_size * draws / took, 1),
              "precision": str(speed.amp or "fp32"), "switches": speed.describe(), "first_step": first,
              "finite": bool(torch.isfinite(last).all())}
    if mode == "captured":
        result |= {"graphs_captured": run_step.captured, "fallback": run_step.off}
    return result


def agree(a: dict, b: dict, rtol: float) -> str | None:
    """Why two first steps differ (same weights, batch and noise), or None."""
    for k, x in a.items():
        y = b.get(k)
        if y is None or not abs(x - y) <= rtol * abs(x) + 1e-5:
            return f"{k} is {y} where the eager step's is {x:.6g}"
    return None


def run(device: torch.device, seconds: float, compile_: bool) -> tuple[dict, list[str]]:
    report = {"machine": machine(device), "families": {}}
    broken = []  # (what, the switch that avoids it)
    amp_name = None
    for family in FAMILIES:
        rows = report["families"][family] = {}
        for mode in ("eager", "captured", "compiled"):
            if mode == "captured":
                why = fast.plan(config([*FAMILIES[family], f"trainer.device={device.type}"]).trainer, device, 1,
                                False).uncaptured
                if why:
                    rows[mode] = {"applies": False, "why": why}
                    continue
            if mode == "compiled" and not compile_:
                rows[mode] = {"applies": False, "why": f"not timed on {device.type} (compile=true times it)"}
                continue
            try:
                row = trial(family, mode, device, seconds)
            except Exception as e:  # noqa: BLE001 - the report names whatever broke
                row = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"}
            row = rows[mode] = {"applies": True, **row}
            eager = rows["eager"]
            if mode == "eager":
                amp_name = row.get("precision")
                if "error" in row:
                    broken.append((f"the default {family} step fails here ({row['error']})",
                                   "trainer.device=cpu" if device.type == "cuda" else None))
                elif not row["finite"]:
                    broken.append((f"the default {family} step's losses are not finite in {amp_name}",
                                   "trainer.precision=fp32"))
                continue
            if "error" in row:
                if mode == "captured":
                    broken.append((f"the captured {family} step fails ({row['error']})", "trainer.cuda_graphs=false"))
                continue
            if mode == "captured":  # its first steps are eager: what agrees or not is its check at the first replay
                row["agrees"] = row["fallback"] or True
                if row["fallback"]:
                    broken.append((f"the captured {family} step failed its check against the eager step "
                                   f"({row['fallback']})", "trainer.cuda_graphs=false"))
            elif "first_step" in eager:  # compiled from the first step: its first losses against the eager ones
                rtol = fast.CHECK_RTOL.get(torch.bfloat16 if amp_name == "torch.bfloat16" else None)
                row["agrees"] = agree(eager["first_step"], row["first_step"], rtol) or True
    return report, broken


def show(report: dict) -> None:
    m = report["machine"]
    gpu = f"{m['gpu']} ({m['gpu_memory_gib']} GiB, compute {m['compute_capability']}, bf16 {m['bf16']}, TF32 {m['tf32']})" \
        if m["gpu"] else "none"
    print(f"torch {m['torch']}, torchvision {m['torchvision']}, CUDA {m['cuda']}, cuDNN {m['cudnn']}, "
          f"Python {m['python']}, {m['cpu_threads']} CPU threads")
    print(f"GPU: {gpu}; pytorch#171622 (compile keeps NCHW on CUDA): {'applies' if m['pytorch_171622_applies'] else 'fixed'}")
    for family, rows in report["families"].items():
        for mode, row in rows.items():
            if not row["applies"]:
                text = f"n/a: {row['why']}"
            elif "error" in row:
                text = f"FAILS: {row['error']}"
            else:
                agrees = row.get("agrees")
                check = "" if agrees is None else "; agrees with eager" if agrees is True else f"; DIFFERS: {agrees}"
                text = f"{row['img_per_s']:.0f} img/s over {row['steps']} steps ({', '.join(row['switches']) or 'fp32'}){check}"
            print(f"  {family:4s} {mode:9s} {text}")


def settings(args: list[str]) -> dict:
    """The command line's key=value settings, checked: one GentrainError line when wrong."""
    keys = dict(a.split("=", 1) for a in args if "=" in a)
    if len(keys) != len(args) or keys.keys() - {"device", "seconds", "compile", "out"}:
        raise GentrainError(f"usage: {USAGE.splitlines()[0]}")
    try:
        seconds = float(keys.get("seconds", 2))
    except ValueError:
        raise GentrainError(f"seconds must be a number, got {keys.get('seconds')!r}") from None
    if not 0 < seconds <= 600:
        raise GentrainError(f"seconds must be in (0, 600], got {seconds}")
    choice = keys.get("compile", "auto")
    if choice not in ("auto", "true", "false"):
        raise GentrainError(f"compile must be auto, true or false, got {choice!r}")
    device = keys.get("device", "auto")
    if device not in ("auto", "cpu", "cuda"):
        raise GentrainError(f"device must be one of auto|cpu|cuda, got {device!r}")
    return {"device": device, "seconds": seconds, "compile": choice, "out": Path(keys.get("out", "doctor.json")).expanduser()}


def main(args: list[str]) -> None:
    if args and args[0] in ("-h", "--help"):
        print(USAGE)
        return
    try:
        s = settings(args)
        device = pick_device(s["device"], key="device")
        compile_ = s["compile"] == "true" or (s["compile"] == "auto" and device.type == "cuda")
        report, broken = run(device, s["seconds"], compile_)
        report["broken"] = [{"what": what, "avoid_with": switch} for what, switch in broken]
        show(report)
        files.write_text(s["out"], json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {s['out']}")
    except GentrainError as e:
        fail(str(e))
    if broken:
        what, switch = broken[0]
        more = f" (and {len(broken) - 1} more in {s['out']})" if len(broken) > 1 else ""
        fail(f"{what}; {switch + ' avoids it' if switch else 'gentrain cannot train here'}{more}", 1)
