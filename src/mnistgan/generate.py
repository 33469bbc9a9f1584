"""python -m mnistgan.generate: images from a saved model.

    python -m mnistgan.generate --checkpoint runs/mnistgan/checkpoint.npz --n 100 --out samples.png
    python -m mnistgan.generate --checkpoint runs/mnistgan --n 10000 --out samples.npy

A .png gets a grid (10 per row); a .npy gets the uint8 array (N, 28, 28).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError
from .fileio import atomic_write
from .train import _Parser, positive_int
from .trainer import Trainer


def parser():
    p = _Parser(prog="python -m mnistgan.generate", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoint.npz or a run folder")
    p.add_argument("--n", type=positive_int, default=100, help="number of images (default 100)")
    p.add_argument("--out", required=True, help="output file: .png (grid) or .npy (uint8 array)")
    p.add_argument("--seed", type=int, default=None, help="seed for z (default: fresh randomness)")
    p.add_argument("--batch-stats", action="store_true",
                   help="normalise with batch statistics as in training, instead of running statistics")
    p.add_argument("--ncols", type=positive_int, default=10, help="images per row of a grid (default 10)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        print(f"mnistgan.generate: error: --out {out}: the name must end in .png or .npy", file=sys.stderr)
        return 2
    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "checkpoint.npz"
    try:
        trainer = Trainer.load(path)
        images = trainer.sample(args.n, seed=args.seed, batch_stats=args.batch_stats)
        if out.suffix == ".npy":
            with atomic_write(out) as f:
                np.save(f, images)
        else:
            from .plots import save_grid

            save_grid(images, out, ncols=args.ncols)
    except (CheckpointError, ValueError) as e:
        print(f"mnistgan.generate: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"mnistgan.generate: error: {e.filename or out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"mnistgan.generate: wrote {args.n} images to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
