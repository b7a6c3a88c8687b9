"""Training throughput on 1 process against N data-parallel processes, for docs/cluster.md.

    python scripts/ddp_throughput.py --devices 1 2 --repeats 3 model=gan dataset=fashion_mnist trainer.steps=600

Each setting trains the same config `--repeats` times in a fresh folder (one after another, never side by
side) and reports the median of the runs' images/s, read from metrics.jsonl after the first log line
(warm-up: data loading, cuDNN autotuning). trainer.batch_size is the global batch in every setting.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def images_per_second(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "img_per_s" in r][1:]  # the first interval holds the warm-up
    if not timed:
        raise SystemExit(f"{run}: too few log lines to time; raise trainer.steps or lower trainer.log_every")
    return statistics.median(r["img_per_s"] for r in timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="gentrain overrides shared by every run")
    args = parser.parse_args()
    base = ["trainer.log_every=50", "trainer.sample_every=100000", "trainer.ckpt_every=100000", *args.overrides]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for devices in args.devices:
            runs = []
            for r in range(args.repeats):
                run = Path(tmp) / f"d{devices}-r{r}"
                subprocess.run([sys.executable, "-m", "gentrain", *base, f"trainer.devices={devices}",
                                f"hydra.run.dir={run}"], check=True, stdout=subprocess.DEVNULL)
                runs.append(images_per_second(run))
            results[devices] = statistics.median(runs)
            print(f"{devices} process(es): median {results[devices]:.0f} img/s over {args.repeats} runs "
                  f"({', '.join(f'{x:.0f}' for x in runs)})", flush=True)
    one = results.get(1)
    print("\n| processes | img/s (median) | vs 1 process |\n|---|---|---|")
    for devices, value in results.items():
        print(f"| {devices} | {value:.0f} | {value / one:.2f}x |" if one else f"| {devices} | {value:.0f} | |")


if __name__ == "__main__":
    main()
