"""Checkpoints: one .npz file with everything a run needs to continue exactly.

Contents (no pickled objects; loaded with allow_pickle=False):
  format           format version (int)
  config           the Config as JSON
  G.params, G.buffers, G.adam_m, G.adam_v, G.adam_steps, and D.* alike
  steps            optimizer steps taken
  rng_state        the numpy Generator's bit-generator state as JSON
  epoch, batch     completed epochs, and batches done in the current epoch
  order            the current epoch's shuffled image order (empty at an epoch boundary)
  history.*        per-step step, epoch, d_loss, g_loss, d_real, d_fake
"""
from __future__ import annotations

import json
import zipfile

import numpy as np

from .config import Config
from .fileio import atomic_write

FORMAT = 1
HISTORY_FIELDS = ("step", "epoch", "d_loss", "g_loss", "d_real", "d_fake")


class CheckpointError(ValueError):
    """A checkpoint is damaged, of another format, or does not fit the model."""


def save(path, *, config: Config, state: dict, rng: np.random.Generator, epoch: int, batch: int,
         order: np.ndarray, history: dict):
    arrays = {
        "format": np.array(FORMAT, np.int64),
        "config": np.array(config.to_json()),
        "rng_state": np.array(json.dumps(rng.bit_generator.state)),
        "epoch": np.array(epoch, np.int64),
        "batch": np.array(batch, np.int64),
        "order": np.asarray(order, np.int64),
    }
    arrays.update(state)
    for name in HISTORY_FIELDS:
        arrays[f"history.{name}"] = np.asarray(history[name],
                                               np.int64 if name in ("step", "epoch") else np.float64)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def load(path) -> dict:
    """Read a checkpoint into a dict of arrays plus 'config' (a Config); CheckpointError if unusable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint .npz file") from None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: damaged or not a mnistgan checkpoint ({e})") from None
    if "format" not in data or "config" not in data:
        raise CheckpointError(f"{path}: not a mnistgan checkpoint (no format or config entry)")
    if int(data["format"]) != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {int(data['format'])}, this mnistgan reads {FORMAT}")
    try:
        data["config"] = Config.from_json(str(data["config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: its config is invalid ({e})") from None
    needed = ["rng_state", "epoch", "batch", "order", "steps"] + [f"history.{h}" for h in HISTORY_FIELDS]
    missing = [k for k in needed if k not in data]
    if missing:
        raise CheckpointError(f"{path}: damaged checkpoint, missing {', '.join(missing)}")
    return data


def architecture_mismatch(saved: Config, current: Config) -> str | None:
    """A sentence saying how two configs' parameter shapes differ, or None."""
    a, b = saved.architecture, current.architecture
    diffs = [f"{k} {a[k]} in the checkpoint, {b[k]} here" for k in a if a[k] != b[k]]
    return "; ".join(diffs) if diffs else None
