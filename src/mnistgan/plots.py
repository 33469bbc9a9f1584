"""Sample grids and loss curves as PNG files.

Grids are encoded here (8-bit grayscale PNG through zlib), so the training
process never imports matplotlib: that keeps a full-size run under 200 MB.
The loss plot uses matplotlib in a child process (`python -m mnistgan.plots
losses.csv losses.png`), started in the background after each epoch.
"""
from __future__ import annotations

import csv
import math
import struct
import subprocess
import sys
import zlib

import numpy as np

from .fileio import atomic_write


def image_grid(images: np.ndarray, ncols: int = 10, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (n, h, w) into one uint8 picture, `ncols` per row."""
    n, h, w = images.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad), np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def encode_png(gray: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of a uint8 array (height, width)."""
    gray = np.ascontiguousarray(gray, np.uint8)
    height, width = gray.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    # Each row starts with filter type 0 (none).
    raw = np.hstack([np.zeros((height, 1), np.uint8), gray]).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def save_grid(images: np.ndarray, path, ncols: int = 10, scale: int = 3):
    """Write uint8 images (n, h, w) as a PNG grid, each pixel `scale` x `scale`."""
    grid = image_grid(np.asarray(images, np.uint8), ncols)
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
    with atomic_write(path) as f:
        f.write(encode_png(grid))


def smooth(values, window: int) -> np.ndarray:
    """Trailing moving average (same length; the first points average fewer)."""
    values = np.asarray(values, np.float64)
    if len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def save_loss_plot(steps, d_loss, g_loss, path, steps_per_epoch: int | None = None):
    """D and G loss per step, faint, with a smoothed line over each."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.asarray(steps)
    window = max(1, len(steps) // 50)
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for values, label, color in ((d_loss, "discriminator", "tab:blue"), (g_loss, "generator", "tab:orange")):
        ax.plot(steps, values, color=color, alpha=0.25, linewidth=0.6)
        ax.plot(steps, smooth(values, window), color=color, linewidth=1.8,
                label=f"{label} (mean of {window} steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("binary cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    if steps_per_epoch:
        sec = ax.secondary_xaxis("top", functions=(lambda s: s / steps_per_epoch,
                                                   lambda e: e * steps_per_epoch))
        sec.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png")


def plot_losses_csv(csv_path, png_path, steps_per_epoch: int | None = None):
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    save_loss_plot([int(r["step"]) for r in rows], [float(r["d_loss"]) for r in rows],
                   [float(r["g_loss"]) for r in rows], png_path, steps_per_epoch)


def plot_metrics_csv(csv_path, png_path):
    """FID per epoch from a run's metrics.csv."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([float(r["epoch"]) for r in rows], [float(r["fid"]) for r in rows], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("FID (bundled classifier features; lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(png_path) as f:
        fig.savefig(f, format="png")


class BackgroundPlotter:
    """Renders a run folder's losses.png (and fid.png, if metrics.csv exists)
    in a child process, one at a time."""

    def __init__(self):
        self._proc = None

    def start(self, run_folder, steps_per_epoch: int):
        self.wait()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mnistgan.plots", str(run_folder), str(steps_per_epoch)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            # Its own process group: a Ctrl-C meant for training leaves the plot be.
            start_new_session=True)

    def wait(self) -> str | None:
        """Wait for the running plot, if any; its error text if it failed."""
        if self._proc is None:
            return None
        _, err = self._proc.communicate()
        failed = self._proc.returncode != 0
        self._proc = None
        return err.decode(errors="replace").strip().splitlines()[-1] if failed and err else None


def plot_run(folder, steps_per_epoch: int | None = None):
    from pathlib import Path

    folder = Path(folder)
    plot_losses_csv(folder / "losses.csv", folder / "losses.png", steps_per_epoch)
    if (folder / "metrics.csv").is_file():
        plot_metrics_csv(folder / "metrics.csv", folder / "fid.png")


if __name__ == "__main__":
    plot_run(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None)
