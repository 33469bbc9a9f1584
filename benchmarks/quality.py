"""Recipe study: how good are the reference recipe's samples, and do the usual
stabilisers help?

    python benchmarks/quality.py            # train what is missing, then write QUALITY.md
    python benchmarks/quality.py run        # only train (resumable: finished runs are skipped)
    python benchmarks/quality.py report     # only evaluate and write benchmarks/QUALITY.md

Every run trains on the bundled mnist-sample (10,000 real MNIST images) for
60 epochs = 12,000 steps of 50: the step count of the reference recipe's 10
epochs over 60,000 images. FID is recorded every 5 epochs (10,000 samples).
Two runs train at a time, one BLAS thread each (this is a 2-core machine).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "quality"

# name -> (extra train flags, seeds, what it is)
VARIANTS = {
    "reference": ([], [0, 1, 2], "the reference recipe (DEVELOPERS.md)"),
    "no-noise": (["--instance-noise", "0"], [0], "instance noise off"),
    "smooth-0.1": (["--label-smoothing", "0.1"], [0], "one-sided label smoothing: real target 0.9"),
    "noise-0.2": (["--instance-noise", "0.2"], [0], "stronger instance noise, 0.2 annealed to 0"),
}


def run_dir(name, seed):
    return RUNS / f"{name}-seed{seed}"


def finished(folder: Path, epochs: int) -> bool:
    cfg = folder / "config.json"
    if not (folder / "checkpoint.npz").is_file() or not cfg.is_file():
        return False
    from mnistgan import Trainer

    try:
        return Trainer.load(folder / "checkpoint.npz").epoch >= epochs
    except Exception:
        return False


def train_all(epochs: int, jobs: int):
    todo = [(n, s) for n, (_, seeds, _) in VARIANTS.items() for s in seeds
            if not finished(run_dir(n, s), epochs)]
    running = []
    while todo or running:
        while todo and len(running) < jobs:
            name, seed = todo.pop(0)
            folder = run_dir(name, seed)
            cmd = [sys.executable, "-m", "mnistgan.train", "--data", "mnist-sample", "--epochs", str(epochs),
                   "--seed", str(seed), "--threads", "1", "--eval-every", "5", "--sample-every", "10",
                   "--no-progress", "--out", str(folder), *VARIANTS[name][0]]
            if (folder / "checkpoint.npz").is_file():
                cmd += ["--resume", str(folder)]
            folder.mkdir(parents=True, exist_ok=True)
            log = open(folder / "train.log", "a")
            print(f"[{time.strftime('%H:%M:%S')}] start {name} seed {seed}", flush=True)
            running.append((name, seed, subprocess.Popen(cmd, stdout=log, stderr=log), time.time()))
        time.sleep(2)
        for item in list(running):
            name, seed, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"[{time.strftime('%H:%M:%S')}] {name} seed {seed}: exit {proc.returncode}, "
                      f"{(time.time() - t0) / 60:.1f} min", flush=True)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def report(epochs: int):
    from mnistgan import Trainer
    from mnistgan.evaluate import evaluate_images, format_table
    from mnistgan.plots import save_grid

    results, curves = {}, {}
    for name, (_, seeds, _) in VARIANTS.items():
        for seed in seeds:
            folder = run_dir(name, seed)
            if not finished(folder, epochs):
                print(f"skipping {name} seed {seed}: not trained to {epochs} epochs")
                continue
            trainer = Trainer.load(folder / "checkpoint.npz")
            for bn, batch_stats in (("running", False), ("batch", True)):
                images = trainer.sample(10000, seed=0, batch_stats=batch_stats)
                results[(name, seed, bn)] = evaluate_images(images)
            curves[(name, seed)] = [(int(r["epoch"]), float(r["fid"])) for r in read_csv(folder / "metrics.csv")]
            if name == "reference" and seed == 0:
                save_grid(trainer.sample(100, seed=1), HERE / "quality_reference_samples.png")
    (HERE / "quality_results.json").write_text(json.dumps(
        {f"{n}/seed{s}/{bn}": r for (n, s, bn), r in results.items()}, indent=1))
    plot_curves(curves)

    lines = ["# Recipe study", "",
             "Command: `python benchmarks/quality.py` (trains, then evaluates; ",
             f"{epochs} epochs over the bundled 10,000-image MNIST sample = {epochs * 200:,} steps of 50, "
             "the step count of the reference recipe on full MNIST).", "",
             "Metrics: `python -m mnistgan.evaluate` on 10,000 samples (z seed 0), with the bundled MNIST "
             "classifier (see README, calibration table). Lower FID is better; score at most 10; "
             "coverage 1 = all classes equally often.", ""]
    ref = [results[k] for k in results if k[0] == "reference" and k[2] == "running"]
    if ref:
        lines += ["## The reference recipe, 3 seeds (samples drawn with batch-norm running statistics)", ""]
        lines.append(format_table({f"seed {s}": results[("reference", s, "running")]
                                   for s in VARIANTS["reference"][1] if ("reference", s, "running") in results}))
        fids = [r["fid"] for r in ref]
        lines += ["", f"FID at {epochs * 200:,} steps: mean {np.mean(fids):.2f}, std {np.std(fids):.2f}, "
                  f"min {min(fids):.2f}, max {max(fids):.2f} over {len(fids)} seeds.", ""]
    lines += ["## Variants side by side (seed 0)", "",
              "Each row: one variant, samples drawn with batch-norm running statistics (`running`, the "
              "default of `sample()`) or with each batch's own statistics (`batch`, as in training).", ""]
    rows = {}
    for name, (_, _, what) in VARIANTS.items():
        for bn in ("running", "batch"):
            if (name, 0, bn) in results:
                rows[f"{name} ({bn}): {what}"] = results[(name, 0, bn)]
    lines.append(format_table(rows))
    lines += ["", "## FID during training", "", "![FID per epoch](quality_fid.png)", "",
              "## Reference recipe, seed 0: 100 samples", "", "![samples](quality_reference_samples.png)", ""]
    (HERE / "QUALITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_curves(curves):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"reference": "tab:blue", "no-noise": "tab:red", "smooth-0.1": "tab:green", "noise-0.2": "tab:purple"}
    for (name, seed), pts in sorted(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color=colors.get(name), alpha=0.9 if seed == 0 else 0.45,
                label=name if seed == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("epoch over the 10,000-image sample (200 steps each)")
    ax.set_ylabel("FID (log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "quality_fid.png")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", choices=["all", "run", "report"])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--jobs", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    a = p.parse_args(argv)
    if a.what in ("all", "run"):
        train_all(a.epochs, a.jobs)
    if a.what in ("all", "report"):
        report(a.epochs)


if __name__ == "__main__":
    main()
