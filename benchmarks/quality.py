"""Recipe study: how good are the reference recipe's samples, and do the usual
stabilisers help?

    python benchmarks/quality.py            # train what is missing, then write QUALITY.md
    python benchmarks/quality.py run        # only train (resumable: finished runs are skipped)
    python benchmarks/quality.py report     # only evaluate and write benchmarks/QUALITY.md

Every run trains on the bundled mnist-sample (10,000 real MNIST images) on
a 60-epoch schedule = 12,000 steps of 50: the step count of the reference
recipe's 10 epochs over 60,000 images. The reference recipe runs all of it
with 3 seeds; each variant (to fit a 2-core machine's afternoon) runs the
same schedule but is stopped cleanly (SIGTERM: checkpoint, exit) at its
budget of epochs and compared with the reference at that same epoch. FID is
recorded every 5 epochs (10,000 samples). Runs use one BLAS thread each.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RUNS = HERE.parent / "runs" / "quality"

# name -> (extra train flags, seeds, what it is, epochs to train of the 60-epoch schedule)
VARIANTS = {
    "reference": ([], [0, 1, 2], "the reference recipe (DEVELOPERS.md)", 60),
    "no-noise": (["--instance-noise", "0"], [0], "instance noise off", 60),
    "smooth-0.1": (["--label-smoothing", "0.1"], [0], "one-sided label smoothing: real target 0.9", 60),
    "noise-0.2": (["--instance-noise", "0.2"], [0], "stronger instance noise: 0.2 annealed to 0", 60),
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


def last_metric_epoch(folder: Path) -> int:
    path = folder / "metrics.csv"
    if not path.is_file():
        return 0
    rows = read_csv(path)
    return int(rows[-1]["epoch"]) if rows else 0


def train_all(epochs: int, jobs: int, only=None):
    todo = [(n, s) for n, (_, seeds, _, budget) in VARIANTS.items() for s in seeds
            if (only is None or n in only) and not finished(run_dir(n, s), min(budget, epochs))]
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
            budget = VARIANTS[name][3]
            if budget < epochs and proc.poll() is None and last_metric_epoch(run_dir(name, seed)) >= budget:
                proc.send_signal(signal.SIGTERM)  # saves a checkpoint at the epoch boundary, exits 130
                proc.wait()
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

    results, curves, shares = {}, {}, {}
    for name, (_, seeds, _, budget) in VARIANTS.items():
        for seed in seeds:
            folder = run_dir(name, seed)
            if not finished(folder, min(budget, epochs)):
                print(f"skipping {name} seed {seed}: not trained to {budget} epochs")
                continue
            trainer = Trainer.load(folder / "checkpoint.npz")
            for bn, batch_stats in (("running", False), ("batch", True)):
                images = trainer.sample(10000, seed=0, batch_stats=batch_stats)
                results[(name, seed, bn)] = evaluate_images(images)
            curves[(name, seed)] = [(int(r["epoch"]), float(r["fid"])) for r in read_csv(folder / "metrics.csv")]
            if name == "reference":
                save_grid(trainer.sample(100, seed=1), HERE / f"quality_reference_seed{seed}.png")
                shares[seed] = digit_shares(trainer.sample(10000, seed=0))
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
    from mnistgan.classifier import bundled

    info = bundled("mnist")[0].info
    lines += ["## The evaluation classifier", "",
              f"`{info['command']}`: MLP 784-512-256-10 trained on the {info['train_images']:,} sample images "
              f"({info['epochs']} epochs, random shifts of up to 2 pixels), **{100 * info['test_accuracy']:.2f}%** "
              f"on the official {info['test_images']:,}-image MNIST test set.", ""]
    calibration = HERE / "CALIBRATION.md"
    if calibration.is_file():
        cal = calibration.read_text().splitlines()
        lines += ["## Calibration: the metrics on real and on broken images", "",
                  "`python benchmarks/calibration.py`:", ""] + [l for l in cal if l.startswith("|")] + [""]
    ref = [results[k] for k in results if k[0] == "reference" and k[2] == "running"]
    if ref:
        lines += ["## The reference recipe, 3 seeds (samples drawn with batch-norm running statistics)", ""]
        lines.append(format_table({f"seed {s}": results[("reference", s, "running")]
                                   for s in VARIANTS["reference"][1] if ("reference", s, "running") in results}))
        fids = [r["fid"] for r in ref]
        lines += ["", f"FID at {epochs * 200:,} steps: mean {np.mean(fids):.2f}, std {np.std(fids):.2f}, "
                  f"min {min(fids):.2f}, max {max(fids):.2f} over {len(fids)} seeds.", ""]
    lines += ["## Sampling with running statistics or batch statistics (reference recipe, final)", "",
              "`running`: batch norm uses its running statistics (the default of `sample()` and "
              "`generate`); `batch`: each batch of 50 is normalised with its own statistics, as in "
              "training (`--batch-stats`).", ""]
    lines.append(format_table({f"seed {s} ({bn})": results[("reference", s, bn)]
                               for s in VARIANTS["reference"][1] for bn in ("running", "batch")
                               if ("reference", s, bn) in results}))
    lines += ["", f"## Variants side by side at {epochs * 200:,} steps (seed 0)", "",
              "Every run on the same 60-epoch schedule (noise annealed over 60 epochs), evaluated at the end "
              "(10,000 samples, z seed 0).", ""]
    rows = {}
    for name, (_, seeds, what, _) in VARIANTS.items():
        for bn in ("running", "batch"):
            if (name, 0, bn) in results:
                rows[f"{name} ({bn}): {what}"] = results[(name, 0, bn)]
    lines.append(format_table(rows))
    for window in ((20, 25, 30), (50, 55, 60)):
        lines += ["", f"FID swings from one evaluation to the next (GAN training oscillates), so also each run's "
                  f"mean FID over its evaluations during training at epochs {', '.join(map(str, window))}:", ""]
        for name, (_, seeds, _, _) in VARIANTS.items():
            for s in seeds:
                path = run_dir(name, s) / "metrics.csv"
                if path.is_file():
                    fids = [float(r["fid"]) for r in read_csv(path) if int(r["epoch"]) in window]
                    if len(fids) == len(window):
                        lines.append(f"- {name}, seed {s}: {np.mean(fids):.1f} "
                                     f"({', '.join(f'{f:.1f}' for f in fids)})")
    lines += ["", "## FID during training", "", "![FID per epoch](quality_fid.png)", "",
              "## Reference recipe after 12,000 steps: which digits it draws", "",
              "Share of each digit among 10,000 samples (z seed 0), as the bundled classifier reads them:", "",
              "| seed | " + " | ".join(str(d) for d in range(10)) + " |", "|---" * 11 + "|"]
    for seed, sh in sorted(shares.items()):
        lines.append(f"| {seed} | " + " | ".join(f"{100 * v:.1f}%" for v in sh) + " |")
    lines += ["", "100 samples from each seed's final model (z seed 1):", ""]
    for seed in sorted(shares):
        lines += [f"Seed {seed}:", "", f"![seed {seed}](quality_reference_seed{seed}.png)", ""]
    (HERE / "QUALITY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def digit_shares(images):
    from mnistgan.classifier import bundled

    probs = bundled("mnist")[0].features_and_probs(images)[1]
    return np.bincount(probs.argmax(1), minlength=10) / len(images)


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
    p.add_argument("--only", nargs="+", choices=list(VARIANTS), help="train only these variants")
    a = p.parse_args(argv)
    if a.what in ("all", "run"):
        train_all(a.epochs, a.jobs, a.only)
    if a.what in ("all", "report"):
        report(a.epochs)


if __name__ == "__main__":
    main()
