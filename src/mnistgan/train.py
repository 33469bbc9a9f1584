"""python -m mnistgan.train: train the GAN and write a run folder.

The run folder (--out, default runs/mnistgan) holds config.json,
checkpoint.npz, losses.csv, losses.png, samples/epoch_NNN.png (a 10x10 grid
from a fixed z) and a final samples.png. Ctrl-C (or SIGTERM) stops between
steps, saves a checkpoint and exits; --resume continues bit-for-bit.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from . import checkpoint as ckpt
from .config import RECIPES, Config, recipe
from .data import DataError, load
from .fileio import atomic_write, remove_stale_temporaries
from .plots import BackgroundPlotter, save_grid
from .trainer import Trainer, TrainingDiverged

EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A problem to report on one line, without a traceback."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, not usage + error: the usage is one --help away.
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    d = Config()
    p = _Parser(prog="python -m mnistgan.train", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model and optimisation flags default to None so that --resume can tell
    # which ones the user set; the effective defaults are Config's.
    p.add_argument("--data", default="mnist",
                   help="mnist (default; falls back to the bundled mnist-sample offline), fashion-mnist, "
                        "mnist-sample, a folder of IDX files, or a .npz with x_train")
    p.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a named recipe (default: reference, the recipe of the README); "
                        "flags given with it override its fields")
    p.add_argument("--epochs", type=int, default=None, help=f"total epochs (default {d.epochs})")
    p.add_argument("--batch-size", type=positive_int, default=None, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=None, help=f"Adam learning rate (default {d.lr})")
    p.add_argument("--beta1", type=float, default=None, help=f"default {d.beta1}")
    p.add_argument("--beta2", type=float, default=None, help=f"default {d.beta2}")
    p.add_argument("--latent-dim", type=positive_int, default=None, help=f"default {d.latent_dim}")
    p.add_argument("--instance-noise", type=float, default=None,
                   help=f"starting std of the instance noise, annealed to 0 (default {d.instance_noise})")
    p.add_argument("--label-smoothing", type=float, default=None,
                   help=f"one-sided: D's target for real images is 1 - this (default {d.label_smoothing})")
    p.add_argument("--seed", type=int, default=None, help=f"default {d.seed}")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None, help="default float32")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="BLAS threads (default: what BLAS chooses, usually one per core); with 2 or "
                        "more, a training step runs on 2 threads (itself and one helper)")
    p.add_argument("--out", default=None,
                   help="run folder (default runs/mnistgan, or the folder of the --resume checkpoint)")
    p.add_argument("--resume", metavar="PATH", default=None,
                   help="a checkpoint.npz or a run folder to continue from")
    p.add_argument("--sample-every", type=positive_int, default=1, metavar="N",
                   help="write a sample grid every N epochs (default 1)")
    p.add_argument("--eval-every", type=positive_int, default=None, metavar="N",
                   help="every N epochs, score samples with the bundled classifier (FID, classifier score, "
                        "class coverage) into metrics.csv and fid.png")
    p.add_argument("--eval-samples", type=positive_int, default=10000, metavar="N",
                   help="samples per evaluation (default 10000; fewer make FID biased upward)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


CONFIG_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "beta1": "beta1",
                "beta2": "beta2", "latent_dim": "latent_dim", "instance_noise": "instance_noise",
                "label_smoothing": "label_smoothing", "seed": "seed", "dtype": "dtype"}
METRIC_FIELDS = ("epoch", "step", "fid", "score", "coverage_entropy", "min_share", "max_share", "seconds")


def build_trainer(args) -> Trainer:
    given = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.resume:
        path = Path(args.resume)
        if path.is_dir():
            path = path / "checkpoint.npz"
        if args.recipe:
            raise CliError("--recipe cannot be combined with --resume: the checkpoint holds its recipe")
        saved = ckpt.load(path)["config"]
        # Only the length of the run may change on resume: anything else would
        # silently train a different recipe than the checkpoint's.
        conflicts = [f"--{k.replace('_', '-')} {v} (checkpoint has {getattr(saved, k)})"
                     for k, v in given.items() if k != "epochs" and v != getattr(saved, k)]
        if conflicts:
            raise CliError(f"--resume {args.resume}: the checkpoint was trained with other settings: "
                           + ", ".join(conflicts))
        return Trainer.load(path, **({"epochs": given["epochs"]} if "epochs" in given else {}))
    try:
        return Trainer(recipe(args.recipe or "reference", **given))
    except ValueError as e:
        raise CliError(str(e).replace("config.", "--").replace("_", "-")) from None


def write_losses_csv(trainer: Trainer, path: Path):
    h = trainer.history
    with atomic_write(path, "w") as f:
        f.write("step,epoch,d_loss,g_loss,d_real,d_fake\n")
        for row in zip(h["step"], h["epoch"], h["d_loss"], h["g_loss"], h["d_real"], h["d_fake"]):
            f.write("%d,%d,%.6g,%.6g,%.6g,%.6g\n" % row)


def write_outputs(trainer: Trainer, out: Path, steps_per_epoch: int, plotter: BackgroundPlotter):
    """Checkpoint, losses.csv and (in the background) losses.png and fid.png."""
    trainer.save(out / "checkpoint.npz")
    write_losses_csv(trainer, out / "losses.csv")
    if trainer.history["step"]:
        plotter.start(out, steps_per_epoch)


def read_metrics(path: Path) -> list[dict]:
    """Rows of an existing metrics.csv (a resumed run appends to them)."""
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(rows: list[dict], path: Path):
    with atomic_write(path, "w") as f:
        f.write(",".join(METRIC_FIELDS) + "\n")
        for r in rows:
            f.write(",".join("%d" % r[k] if k in ("epoch", "step") else "%.6g" % r[k] for k in METRIC_FIELDS) + "\n")


class _StopFlag:
    """SIGINT/SIGTERM set a flag that the training loop reads between steps."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        # A second Ctrl-C is not swallowed: the default handler is back.
        signal.signal(signum, self._old[signum])

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __call__(self) -> bool:
        return self.signal is not None


def run(args) -> int:
    from tqdm import tqdm

    trainer = build_trainer(args)
    c = trainer.config
    try:
        images, _, description = load(args.data, progress=not args.no_progress)
    except DataError as e:
        raise CliError(str(e)) from None
    if args.out is not None:
        out = Path(args.out)
    elif args.resume:
        out = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
    else:
        out = Path("runs/mnistgan")
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        for folder in (out, out / "samples"):
            remove_stale_temporaries(folder)
        with atomic_write(out / "config.json", "w") as f:
            f.write(c.to_json() + "\n")
    except OSError as e:
        raise CliError(f"cannot write the run folder {out}: {e.strerror or e}") from None
    try:
        trainer.as_rows(images)
    except (TypeError, ValueError) as e:
        raise CliError(f"--data {args.data}: {e}") from None
    per_epoch = len(images) // c.batch_size
    print(f"mnistgan: training on {description}; {c.epochs} epochs of {per_epoch} steps, "
          f"batch {c.batch_size}, {c.dtype}; run folder {out}", file=sys.stderr)
    fixed_z = trainer.fixed_z(100)
    plotter = BackgroundPlotter()
    eval_dataset = "fashion-mnist" if args.data == "fashion-mnist" else "mnist"
    metric_rows = read_metrics(out / "metrics.csv") if args.resume else []
    if metric_rows:
        metric_rows = [r for r in metric_rows if r["epoch"] <= trainer.epoch]

    bar = None
    t0 = [time.perf_counter(), trainer.step]

    def on_step(tr, stats):
        if bar is None:
            return
        bar.update(1)
        if tr.batch % 10 == 0 or tr.batch == per_epoch:
            now = time.perf_counter()
            rate = (tr.step - t0[1]) * c.batch_size / max(now - t0[0], 1e-9)
            bar.set_postfix_str(f"D {stats.d_loss:.3f}  G {stats.g_loss:.3f}  {rate:,.0f} img/s")
            t0[0], t0[1] = now, tr.step

    def on_epoch(tr):
        nonlocal bar
        if bar is not None:
            bar.close()
        if tr.epoch % args.sample_every == 0 or tr.epoch == c.epochs:
            save_grid(tr.generate(fixed_z), out / "samples" / f"epoch_{tr.epoch:03d}.png")
        if args.eval_every and (tr.epoch % args.eval_every == 0 or tr.epoch == c.epochs):
            from .evaluate import evaluate_images

            t_eval = time.perf_counter()
            result = evaluate_images(tr.sample(args.eval_samples, seed=0), eval_dataset,
                                     precision_recall=False, memorisation=False)
            result.update(epoch=tr.epoch, step=tr.step, seconds=time.perf_counter() - t_eval)
            metric_rows.append(result)
            write_metrics(metric_rows, out / "metrics.csv")
        write_outputs(tr, out, per_epoch, plotter)
        if tr.epoch < target:
            bar = new_bar(tr.epoch + 1)

    def new_bar(epoch):
        t0[0], t0[1] = time.perf_counter(), trainer.step
        return tqdm(total=per_epoch, initial=trainer.batch if epoch == trainer.epoch + 1 else 0,
                    desc=f"epoch {epoch}/{target}", unit="step", leave=True, file=sys.stderr,
                    disable=args.no_progress, dynamic_ncols=True)

    target = c.epochs
    if trainer.epoch >= target:
        print(f"mnistgan: the checkpoint has already trained {trainer.epoch} epochs (of {target}); "
              f"pass --epochs to train more", file=sys.stderr)
    else:
        bar = new_bar(trainer.epoch + 1)
    from threadpoolctl import threadpool_limits

    with _StopFlag() as stop, threadpool_limits(limits=args.threads, user_api="blas"):
        try:
            finished = trainer.fit(images, on_step=on_step, on_epoch=on_epoch, should_stop=stop)
        except TrainingDiverged as e:
            if bar is not None:
                bar.close()
            raise CliError(f"{e}; the last good checkpoint is kept in {out / 'checkpoint.npz'}") from None
        if bar is not None:
            bar.close()
        if not finished:
            write_outputs(trainer, out, per_epoch, plotter)
            plotter.wait()
            print(f"mnistgan: stopped by {stop.signal} at epoch {trainer.epoch + 1}, "
                  f"step {trainer.step}; checkpoint saved. Continue with: "
                  f"python -m mnistgan.train --resume {out}", file=sys.stderr)
            return EXIT_INTERRUPTED
    save_grid(trainer.generate(fixed_z), out / "samples.png")
    if not (out / "checkpoint.npz").exists():
        write_outputs(trainer, out, per_epoch, plotter)
    plot_error = plotter.wait()
    if plot_error:
        print(f"mnistgan: warning: losses.png was not drawn ({plot_error})", file=sys.stderr)
    print(f"mnistgan: done, {trainer.epoch} epochs, {trainer.step} steps; "
          f"samples in {out / 'samples.png'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (CliError, ckpt.CheckpointError, DataError) as e:
        print(f"mnistgan.train: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mnistgan.train: error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
