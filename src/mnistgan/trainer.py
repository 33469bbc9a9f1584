"""Trainer: epochs, shuffling, the noise schedule, sampling, save and load.

It drives the GAN step; it computes nothing itself.

    from mnistgan import Trainer, Config
    from mnistgan.data import load_images

    trainer = Trainer(Config(epochs=10))
    trainer.fit(load_images("mnist-sample"))
    images = trainer.sample(64)          # uint8, (64, 28, 28)
    trainer.save("checkpoint.npz")
    again = Trainer.load("checkpoint.npz")
"""
from __future__ import annotations

import json
import math
from typing import Callable

import numpy as np

from . import _kernels as K
from . import checkpoint as ckpt
from .config import Config
from .gan import GAN, StepStats


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the trainer's state is no longer usable."""


class Trainer:
    """Train the GAN of `config` (a Config; keyword overrides also accepted)."""

    def __init__(self, config: Config | None = None, **overrides):
        if config is None:
            config = Config(**overrides)
        elif overrides:
            config = Config.from_dict({**config.to_dict(), **overrides})
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.gan = GAN(config, self.rng)
        self.epoch = 0          # completed epochs
        self.batch = 0          # batches done in the current epoch
        self.order = np.zeros(0, np.int64)
        self.history = {name: [] for name in ckpt.HISTORY_FIELDS}

    # -- training -------------------------------------------------------------

    @property
    def step(self) -> int:
        return self.gan.steps

    def noise_std(self, step: int, steps_per_epoch: int) -> float:
        """Instance-noise std at `step`: config.instance_noise falling linearly
        to 0 at the end of config.epochs."""
        total = self.config.epochs * steps_per_epoch
        if total <= 0:
            return 0.0
        return self.config.instance_noise * max(0.0, 1.0 - step / total)

    def as_rows(self, images: np.ndarray) -> np.ndarray:
        """The images as a C-contiguous uint8 (N, image_dim) view, or TypeError/ValueError."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8 pixels 0..255, got dtype {images.dtype}")
        if images.ndim < 2 or math.prod(images.shape[1:]) != self.config.image_dim:
            raise ValueError(f"images have shape {images.shape}: each image must have "
                             f"{self.config.image_dim} pixels")
        rows = np.ascontiguousarray(images.reshape(len(images), self.config.image_dim))
        if len(rows) < self.config.batch_size:
            raise ValueError(f"{len(rows)} images is fewer than one batch of {self.config.batch_size}")
        return rows

    def fit(self, images: np.ndarray, epochs: int | None = None, *,
            on_step: Callable[["Trainer", StepStats], None] | None = None,
            on_epoch: Callable[["Trainer"], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> bool:
        """Train on uint8 images (N, 28, 28) for `epochs` more epoch ends.

        epochs=None trains until config.epochs epochs are complete. A
        partially done epoch (after a resume) is finished first and counts as
        one. Each epoch visits the images in a fresh order drawn from the
        seeded generator; the last incomplete batch is dropped.
        should_stop() is asked between steps; the trainer then stops with a
        consistent state that save() can write. Each epoch's steps run in one
        helper session (GAN.session): on_step is called there, with BLAS
        held to one thread. Returns True if the epochs
        ran to the end, False if stopped.
        """
        rows = self.as_rows(images)
        B = self.config.batch_size
        per_epoch = len(rows) // B
        if len(self.order) and len(self.order) != len(rows):
            raise ValueError(f"resuming an epoch over {len(self.order)} images with {len(rows)} images: "
                             f"give the same data set")
        target = self.config.epochs if epochs is None else self.epoch + int(epochs)
        while self.epoch < target:
            if len(self.order) == 0:
                # Drawn once per epoch; kept in checkpoints, so a stop at any
                # point (even right after this draw) resumes the same order.
                self.order = self.rng.permutation(len(rows)).astype(np.int64)
            # One helper session per epoch, not per step (mnistgan.parallel):
            # on_step runs inside it, with BLAS on one thread.
            with self.gan.session():
                while self.batch < per_epoch:
                    if should_stop is not None and should_stop():
                        return False
                    idx = self.order[self.batch * B:(self.batch + 1) * B]
                    stats = self.gan.train_step(rows, idx, self.noise_std(self.step, per_epoch))
                    self.batch += 1
                    self._record(stats)
                    if on_step is not None:
                        on_step(self, stats)
            self._check_parameters()
            self.epoch += 1
            self.batch = 0
            self.order = np.zeros(0, np.int64)
            if on_epoch is not None:
                on_epoch(self)
        return True

    def _check_parameters(self):
        """Losses catch most blow-ups at once; this catches a parameter gone
        NaN or infinite that the losses have not shown yet (one pass, ~1 ms)."""
        for net in (self.gan.G, self.gan.D):
            for name, array in (("parameters", net.flat_params), ("Adam moments", net.adam_v),
                                ("batch-norm statistics", net.flat_buffers)):
                if array.size and not K.all_finite(array):
                    raise TrainingDiverged(f"training diverged by step {self.step} (epoch {self.epoch + 1}): "
                                           f"the {net.name}'s {name} hold NaN or infinity")

    def _record(self, stats: StepStats):
        if not (math.isfinite(stats.d_loss) and math.isfinite(stats.g_loss)):
            raise TrainingDiverged(
                f"training diverged at step {self.step} (epoch {self.epoch + 1}): "
                f"d_loss={stats.d_loss}, g_loss={stats.g_loss}")
        h = self.history
        h["step"].append(self.step)
        h["epoch"].append(self.epoch + 1)
        h["d_loss"].append(stats.d_loss)
        h["g_loss"].append(stats.g_loss)
        h["d_real"].append(stats.d_real)
        h["d_fake"].append(stats.d_fake)

    # -- sampling -------------------------------------------------------------

    def generate(self, z: np.ndarray, *, batch_stats: bool = False) -> np.ndarray:
        """uint8 images (n, 28, 28) from latent vectors z (n, latent_dim)."""
        x = self.gan.generate(z, batch_stats=batch_stats)
        pixels = np.rint((x.astype(np.float64) + 1) * 127.5).clip(0, 255).astype(np.uint8)
        side = math.isqrt(self.config.image_dim)
        if side * side == self.config.image_dim:
            return pixels.reshape(len(pixels), side, side)
        return pixels

    def sample(self, n: int, *, seed: int | None = None, batch_stats: bool = False) -> np.ndarray:
        """n new images, uint8 (n, 28, 28). Uses its own generator (seeded by
        `seed`), so sampling never changes the training's random stream."""
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        z = np.random.default_rng(seed).standard_normal((int(n), self.config.latent_dim))
        return self.generate(z, batch_stats=batch_stats)

    def fixed_z(self, n: int = 100) -> np.ndarray:
        """The same n latent vectors for every epoch's grid (derived from the seed)."""
        return np.random.default_rng([self.config.seed, 2024]).standard_normal((n, self.config.latent_dim))

    # -- save and load ------------------------------------------------------------

    def save(self, path):
        """Write a checkpoint (temporary file, then rename). A state holding
        NaN or infinity is refused, so a good checkpoint is never replaced by
        a broken one."""
        self._check_parameters()
        ckpt.save(path, config=self.config, state=self.gan.state(), rng=self.rng,
                  epoch=self.epoch, batch=self.batch, order=self.order, history=self.history)

    def restore(self, path):
        """Load a checkpoint into this trainer; its architecture must match."""
        data = ckpt.load(path)
        diff = ckpt.architecture_mismatch(data["config"], self.config)
        if diff:
            raise ckpt.CheckpointError(f"{path}: another architecture ({diff})")
        try:
            self.gan.load_state(data)
        except (KeyError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: does not fit the model ({e})") from None
        try:
            self.rng.bit_generator.state = json.loads(str(data["rng_state"]))
        except (ValueError, TypeError, KeyError) as e:
            raise ckpt.CheckpointError(f"{path}: invalid random generator state ({e})") from None
        self.epoch = int(data["epoch"])
        self.batch = int(data["batch"])
        self.order = np.asarray(data["order"], np.int64)
        self.history = {name: data[f"history.{name}"].tolist() for name in ckpt.HISTORY_FIELDS}
        return self

    @classmethod
    def load(cls, path, **overrides) -> "Trainer":
        """A Trainer rebuilt from a checkpoint (its config, optionally with
        non-architecture fields such as epochs overridden)."""
        config = ckpt.load(path)["config"]
        if overrides:
            config = Config.from_dict({**config.to_dict(), **overrides})
        return cls(config).restore(path)
