"""The GAN: a generator, a discriminator, and one training step.

One step (`train_step`):
  0. G makes both fake batches of the step at once: 2B rows of z, batch norm
     statistics per half (exactly two forwards of B rows: G's parameters do
     not change in the D update, and its running statistics move half after
     half), so the GEMMs have 2B rows. The first half feeds the D update, the
     second the G update.
  1. D update: a real batch (gathered from uint8 images) and the first fake
     batch go through D as ONE batch of 2B rows (real first). D has no
     batch norm, so this equals two separate passes, and every activation of
     both halves is kept for the backward (no real-pass cache overwritten by
     the fake pass). Loss: mean BCE over the 2B rows, i.e.
     (BCE(D(real), 1) + BCE(D(fake), 0)) / 2. Adam on D, layer by layer
     inside D's backward pass (one BackwardPlan; D's input gradient is not
     needed and not computed).
  2. G update: the second fake batch, D on it (B rows), non-saturating loss
     BCE(D(fake), 1). Only the input gradient flows back through D; D's
     weight gradients are not computed. G backpropagates the second half of
     its forward only. Adam on G, inside G's backward.
With two or more BLAS threads the step runs as a helper session
(mnistgan.parallel): BLAS on one thread, every forward and backward shared
with a helper thread; the arithmetic, and so the result, is the same.
Instance noise: every image D sees gets std * N(0, 1) added (real and fake).

Random draws, in this order per step: z (2B, latent: rows for the D update,
then for the G update), then if std > 0 the noise (3B, image_dim: real and
fake rows of the D update, then the G update's fake rows). All from the one
seeded Generator, in the model's dtype, by the
Box-Muller kernel (_kernels.standard_normal: 5x faster than numpy's own
normals in float32, and a stream of its own).
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from . import _kernels as K
from .config import Config
from .parallel import blas_threads, helper_session
from .network import DenseStack


class StepStats(NamedTuple):
    d_loss: float
    g_loss: float
    d_real: float  # mean D output (probability) on the real batch
    d_fake: float  # mean D output on the fake batch of the D update


class GAN:
    """Generator and discriminator of `config`, with all step buffers allocated once."""

    def __init__(self, config: Config | None = None, rng: np.random.Generator | None = None,
                 *, parallel: bool | None = None):
        c = self.config = config if config is not None else Config()
        self.rng = rng if rng is not None else np.random.default_rng(c.seed)
        self.dtype = np.dtype(c.dtype)
        B = c.batch_size
        common = dict(dtype=self.dtype, rng=self.rng, bn_momentum=c.bn_momentum, bn_eps=c.bn_eps)
        self.G = DenseStack([c.latent_dim, *c.g_hidden, c.image_dim], hidden_batchnorm=True,
                            output="tanh", max_batch=2 * B, bn_groups=2, name="generator", **common)
        self.D = DenseStack([c.image_dim, *c.d_hidden, 1], hidden_batchnorm=False,
                            output="linear", max_batch=2 * B, input_grad=True,
                            name="discriminator", **common)
        dt = self.dtype
        self.z = np.zeros((2 * B, c.latent_dim), dt)         # D update's rows, then G update's
        self.d_input = np.zeros((2 * B, c.image_dim), dt)   # real rows, then fake rows
        self.g_input = np.zeros((B, c.image_dim), dt)       # the G update's noisy fakes
        self.noise = np.zeros((3 * B, c.image_dim), dt)     # real, fake (D update), fake (G update)
        self.d_targets = np.zeros((2 * B, 1), dt)
        self.d_targets[:B] = 1 - c.label_smoothing
        self.g_targets = np.ones((B, 1), dt)
        self.probs = np.zeros((2 * B, 1), dt)
        # Views used every step, cut once.
        self._real = self.d_input[:B]
        self._fake = self.d_input[B:]
        self._z_d = self.z[:B]
        self._z_g = self.z[B:]
        self._noise_d = self.noise[:2 * B]
        self._noise_real = self.noise[:B]
        self._noise_fake = self.noise[B:2 * B]
        self._noise_g = self.noise[2 * B:]
        self._probs_real = self.probs[:B]
        self._probs_fake = self.probs[B:]
        self._probs_g = self.probs[:B]
        self._d_grad_out = self.D.grad_output(2 * B)
        self._g_grad_out = self.D.grad_output(B)
        self.steps = 0
        # Share each step with a helper thread when BLAS may use >= 2
        # threads (mnistgan.parallel); parallel=False leaves the threads to BLAS.
        self.parallel = True if parallel is None else bool(parallel)
        self._crew = K.Crew()
        self._gen_inputs: dict[int, np.ndarray] = {}
        self._session_crew = None
        self._session_depth = 0

    @property
    def batch_size(self) -> int:
        return self.config.batch_size

    # -- the two halves of a step, on the step buffers -----------------------

    def _draw(self, std: float):
        K.standard_normal(self.rng, self.z)
        if std > 0:
            K.standard_normal(self.rng, self.noise)
        else:
            self.noise[...] = 0

    def _discriminator_loss(self, fake: np.ndarray, std: float, crew=None) -> tuple[float, float, float]:
        """D loss, its gradient in _d_grad_out, from the real rows of d_input,
        the fake batch (B, image_dim) and the first 2B rows of noise."""
        K.add_noise(self._real, self._noise_real, std, self._real)
        K.add_noise(fake, self._noise_fake, std, self._fake)
        logits = self.D.forward(self.d_input, crew=crew)
        loss = K.sigmoid_bce(logits, self.d_targets, self.probs, self._d_grad_out)
        return loss, float(self._probs_real.mean()), float(self._probs_fake.mean())

    def _generator_loss(self, fake: np.ndarray, std: float, crew=None) -> tuple[float, np.ndarray]:
        """G loss and its gradient w.r.t. the fake batch (B, image_dim), with the last B rows of noise."""
        K.add_noise(fake, self._noise_g, std, self.g_input)
        logits = self.D.forward(self.g_input, crew=crew)
        loss = K.sigmoid_bce(logits, self.g_targets, self._probs_g, self._g_grad_out)
        # Noise is additive, so d loss / d fake = d loss / d (fake + noise).
        d_fake = self.D.backward(self._g_grad_out, param_grads=False, crew=crew)
        return loss, d_fake

    # -- public ------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self):
        """Keep the helper thread for every step and generate() inside the
        block (Trainer holds one per epoch), instead of one session per call;
        yields the crew, or None with one BLAS thread or parallel=False.
        BLAS is held to one thread throughout. Re-entrant."""
        if self._session_depth:
            self._session_depth += 1
            try:
                yield self._session_crew
            finally:
                self._session_depth -= 1
            return
        shared = self.parallel and blas_threads() >= 2
        with helper_session(self._crew if shared else None) as crew:
            self._session_crew, self._session_depth = crew, 1
            try:
                yield crew
            finally:
                self._session_crew, self._session_depth = None, 0

    def train_step(self, images: np.ndarray, idx: np.ndarray, noise_std: float) -> StepStats:
        """One D update then one G update. images: (N, image_dim) uint8; idx: (B,) int64."""
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std}")
        c = self.config
        if getattr(images, "ndim", 0) != 2 or images.shape[1] != c.image_dim:
            raise ValueError(f"images has shape {getattr(images, 'shape', None)}, expected (N, {c.image_dim})")
        if getattr(idx, "shape", None) != (c.batch_size,):
            raise ValueError(f"idx has shape {getattr(idx, 'shape', None)}, expected ({c.batch_size},)")
        B = c.batch_size
        with self.session() as crew:
            K.gather_batch(images, idx, self._real)
            self._draw(noise_std)
            fakes = self.G.forward(self.z, train=True, groups=2, crew=crew)
            d_loss, d_real, d_fake = self._discriminator_loss(fakes[:B], noise_std, crew)
            self.D.backward_and_update(self._d_grad_out, c.lr, c.beta1, c.beta2, c.adam_eps, crew=crew)
            g_loss, grad_fake = self._generator_loss(fakes[B:], noise_std, crew)
            self.G.backward_and_update(grad_fake, c.lr, c.beta1, c.beta2, c.adam_eps, crew=crew,
                                       group=1)
        self.steps += 1
        return StepStats(d_loss, g_loss, d_real, d_fake)

    def discriminator_gradients(self, real, z, noise, noise_std: float) -> float:
        """D loss for given inputs, its gradients left in D.grads; no update.

        real: (B, image_dim) floats in [-1, 1]; z: (B, latent_dim);
        noise: (2B, image_dim) standard normal draws. For tests and tools.
        """
        self._real[...] = real
        self._z_d[...] = z
        self._noise_d[...] = noise
        loss = self._discriminator_loss(self.G.forward(self._z_d, train=True), noise_std)[0]
        self.D.backward(self._d_grad_out, param_grads=True, input_grad=False)
        return loss

    def generator_gradients(self, z, noise, noise_std: float) -> float:
        """G loss for given z (B, latent_dim), noise (B, image_dim); gradients in G.grads."""
        self._z_g[...] = z
        self._noise_g[...] = noise
        loss, grad_fake = self._generator_loss(self.G.forward(self._z_g, train=True), noise_std)
        self.G.backward(grad_fake, param_grads=True)
        return loss

    def generate(self, z: np.ndarray, *, batch_stats: bool = False) -> np.ndarray:
        """Images in [-1, 1], shape (n, image_dim), from z (n, latent_dim); a new array.

        batch_stats=False uses batch norm's running statistics (evaluation
        mode); True normalises with the statistics of each chunk of
        batch_size rows, as during training, without moving the running
        statistics (n must then be >= 2).
        """
        z = np.asarray(z)
        c = self.config
        if z.ndim != 2 or z.shape[1] != c.latent_dim:
            raise ValueError(f"z has shape {z.shape}, expected (n, {c.latent_dim})")
        if not np.issubdtype(z.dtype, np.floating):
            raise TypeError(f"z must be a float array, got {z.dtype}")
        z = np.ascontiguousarray(z, dtype=self.dtype)
        if not K.all_finite(z):
            raise ValueError("z contains NaN or infinity")
        n = z.shape[0]
        if batch_stats and n < 2:
            raise ValueError("generating with batch statistics needs n >= 2")
        out = np.empty((n, c.image_dim), self.dtype)
        B = c.batch_size
        # Running statistics make rows independent: chunks as large as G's
        # buffers. Batch statistics are those of batch_size rows.
        chunk = B if batch_stats else 2 * B
        with self.session() as crew:
            start = 0
            while start < n:
                stop = min(start + chunk, n)
                if batch_stats and stop - start < 2:
                    start = stop - 2  # a lone last row joins the chunk before it
                # One input array per chunk size, so that G's plans are reused.
                zin = self._gen_inputs.get(stop - start)
                if zin is None:
                    zin = self._gen_inputs[stop - start] = np.empty((stop - start, c.latent_dim), self.dtype)
                zin[...] = z[start:stop]
                out[start:stop] = self.G.forward(zin, train=batch_stats, update_running=False, crew=crew)
                start = stop
        return out

    def state(self) -> dict[str, np.ndarray]:
        """Every array of the training state, prefixed 'G.' and 'D.' (views)."""
        s = {f"G.{k}": v for k, v in self.G.state().items()}
        s.update({f"D.{k}": v for k, v in self.D.state().items()})
        s["steps"] = np.array(self.steps, np.int64)
        return s

    def load_state(self, state: dict[str, np.ndarray]):
        self.G.load_state({k[2:]: v for k, v in state.items() if k.startswith("G.")})
        self.D.load_state({k[2:]: v for k, v in state.items() if k.startswith("D.")})
        self.steps = int(state["steps"])
