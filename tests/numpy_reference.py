"""An independent, plain-NumPy implementation of the mnistgan training step.

Written from the math, without the kernels, and deliberately organised
differently from the package: D runs on the real and the fake batch as two
separate passes with their own caches, and the two gradients are summed. It
is the reference the Cython step is checked against, and the "NumPy" column
of the benchmarks.

Weights are (fan_in, fan_out), as in the package, so parameters can be
copied across.
"""
from __future__ import annotations

import numpy as np


def _sigmoid(z):
    return np.where(z >= 0, 1 / (1 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1 + np.exp(-np.abs(z))))


class RefMLP:
    def __init__(self, weights, biases, gammas=(), betas=(), running_means=(), running_vars=(),
                 output="linear", momentum=0.1, eps=1e-5):
        self.W = [np.array(w) for w in weights]
        self.b = [np.array(b) for b in biases]
        self.gamma = [np.array(g) for g in gammas]
        self.beta = [np.array(b) for b in betas]
        self.rm = [np.array(x) for x in running_means]
        self.rv = [np.array(x) for x in running_vars]
        self.bn = len(self.gamma) > 0
        self.output = output
        self.momentum = momentum
        self.eps = eps
        self.m = {}
        self.v = {}
        self.t = 0

    def params(self):
        out = {}
        for i, (w, b) in enumerate(zip(self.W, self.b)):
            out[f"dense{i}.weight"] = w
            out[f"dense{i}.bias"] = b
        for i, (g, b) in enumerate(zip(self.gamma, self.beta)):
            out[f"bn{i}.weight"] = g
            out[f"bn{i}.bias"] = b
        return out

    def forward(self, x):
        """Returns output and a cache list for backward."""
        cache = []
        h = x
        L = len(self.W)
        for i in range(L):
            a = h @ self.W[i] + self.b[i]
            if i < L - 1:
                r = np.maximum(a, 0)
                if self.bn:
                    n = r.shape[0]
                    mu = r.mean(axis=0)
                    var = ((r - mu) ** 2).mean(axis=0)
                    inv = 1 / np.sqrt(var + self.eps)
                    xhat = (r - mu) * inv
                    y = self.gamma[i] * xhat + self.beta[i]
                    m = self.momentum
                    self.rm[i] = (1 - m) * self.rm[i] + m * mu
                    self.rv[i] = (1 - m) * self.rv[i] + m * var * n / (n - 1)
                    cache.append((h, r, xhat, inv))
                    h = y
                else:
                    cache.append((h, r, None, None))
                    h = r
            else:
                out = np.tanh(a) if self.output == "tanh" else a
                cache.append((h, out, None, None))
        return out, cache

    def backward(self, dout, cache):
        """Returns (grads dict, dx)."""
        grads = {}
        L = len(self.W)
        g = dout
        for i in range(L - 1, -1, -1):
            h_in, act, xhat, inv = cache[i]
            if i == L - 1:
                if self.output == "tanh":
                    g = g * (1 - act ** 2)
            else:
                if self.bn:
                    n = g.shape[0]
                    grads[f"bn{i}.weight"] = (g * xhat).sum(axis=0)
                    grads[f"bn{i}.bias"] = g.sum(axis=0)
                    dxhat = g * self.gamma[i]
                    g = inv / n * (n * dxhat - dxhat.sum(axis=0) - xhat * (dxhat * xhat).sum(axis=0))
                g = g * (act > 0)
            grads[f"dense{i}.weight"] = h_in.T @ g
            grads[f"dense{i}.bias"] = g.sum(axis=0)
            g = g @ self.W[i].T
        return grads, g

    def adam(self, grads, lr, beta1, beta2, eps):
        self.t += 1
        for name, p in self.params().items():
            g = grads[name]
            m = self.m.get(name, np.zeros_like(p))
            v = self.v.get(name, np.zeros_like(p))
            m = beta1 * m + (1 - beta1) * g
            v = beta2 * v + (1 - beta2) * g * g
            self.m[name], self.v[name] = m, v
            m_hat = m / (1 - beta1 ** self.t)
            v_hat = v / (1 - beta2 ** self.t)
            p -= lr * m_hat / (np.sqrt(v_hat) + eps)


def box_muller(rng, shape, dtype):
    """Standard normals as the package draws them (mnistgan._kernels.standard_normal),
    computed in float64 with numpy's log, cos and sin from rng's raw 64-bit words."""
    n = int(np.prod(shape))
    pairs = (n + 1) // 2
    if np.dtype(dtype) == np.float32:
        raw = rng.bit_generator.random_raw(pairs)
        u1 = ((raw & 0xFFFFFFFF) >> 9).astype(np.float64) + 0.5
        u1 /= 2.0 ** 23
        u2 = (raw >> 40).astype(np.float64) / 2.0 ** 24
    else:
        raw = rng.bit_generator.random_raw(2 * pairs).reshape(pairs, 2)
        u1 = ((raw[:, 0] >> 12).astype(np.float64) + 0.5) / 2.0 ** 52
        u2 = (raw[:, 1] >> 12).astype(np.float64) / 2.0 ** 52
    rad = np.sqrt(-2 * np.log(u1))
    z = np.stack([rad * np.cos(2 * np.pi * u2), rad * np.sin(2 * np.pi * u2)], axis=1).ravel()
    return z[:n].reshape(shape).astype(dtype)


def bce_mean(logits, target):
    """Mean BCE of sigmoid(logits) vs a constant target in [0, 1], and its gradient."""
    n = logits.size
    # -t log s(z) - (1 - t) log(1 - s(z)) = t softplus(-z) + (1 - t) softplus(z)
    loss = (target * np.logaddexp(0, -logits) + (1 - target) * np.logaddexp(0, logits)).mean()
    return float(loss), (_sigmoid(logits) - target) / n


class RefGAN:
    """The whole GAN step in NumPy, started from a package GAN's parameters.

    compute_dtype: the precision of the arithmetic (default: the config's
    dtype). float64 for a float32 config gives the exact answer to the
    float32 step's question: the same float32 draws and data, upcast.
    """

    def __init__(self, gan, seed, compute_dtype=None):
        c = self.config = gan.config
        self.dtype = np.dtype(c.dtype)                     # of the draws
        self.compute = np.dtype(compute_dtype or c.dtype)  # of the math
        G, D = gan.G, gan.D
        nG = len(G.sizes) - 1
        self.G = RefMLP([G.params[f"dense{i}.weight"] for i in range(nG)],
                        [G.params[f"dense{i}.bias"] for i in range(nG)],
                        [G.params[f"bn{i}.weight"] for i in range(nG - 1)],
                        [G.params[f"bn{i}.bias"] for i in range(nG - 1)],
                        [G.buffers[f"bn{i}.running_mean"] for i in range(nG - 1)],
                        [G.buffers[f"bn{i}.running_var"] for i in range(nG - 1)],
                        output="tanh", momentum=c.bn_momentum, eps=c.bn_eps)
        nD = len(D.sizes) - 1
        self.D = RefMLP([D.params[f"dense{i}.weight"] for i in range(nD)],
                        [D.params[f"dense{i}.bias"] for i in range(nD)], output="linear")
        for net in (self.G, self.D):
            for arrays in (net.W, net.b, net.gamma, net.beta, net.rm, net.rv):
                arrays[:] = [a.astype(self.compute) for a in arrays]
        self.rng = np.random.default_rng(seed)

    def sync_from(self, gan):
        """Copy the package GAN's whole training state (parameters, Adam
        moments and counts, running statistics, random stream) into this one."""
        for net, ref in ((gan.G, self.G), (gan.D, self.D)):
            for name, p in ref.params().items():
                p[...] = net.params[name]
                offset = (net.params[name].ctypes.data - net.flat_params.ctypes.data) // net.flat_params.itemsize
                ref.m[name] = net.adam_m[offset:offset + p.size].reshape(p.shape).astype(self.compute)
                ref.v[name] = net.adam_v[offset:offset + p.size].reshape(p.shape).astype(self.compute)
            ref.t = net.adam_steps
        for i in range(len(self.G.rm)):
            self.G.rm[i] = gan.G.running_mean[i].astype(self.compute)
            self.G.rv[i] = gan.G.running_var[i].astype(self.compute)
        self.rng.bit_generator.state = gan.rng.bit_generator.state

    def d_loss_and_grads(self, real, z, noise, std):
        B = real.shape[0]
        fake, _ = self.G.forward(z)
        xr = real + std * noise[:B]
        xf = fake + std * noise[B:]
        lr_, cr = self.D.forward(xr)
        lf_, cf = self.D.forward(xf)
        loss_r, gr = bce_mean(lr_, 1 - self.config.label_smoothing)
        loss_f, gf = bce_mean(lf_, 0)
        # D's loss is the mean over all 2B examples: half of each batch mean.
        grads_r, _ = self.D.backward(0.5 * gr, cr)
        grads_f, _ = self.D.backward(0.5 * gf, cf)
        grads = {k: grads_r[k] + grads_f[k] for k in grads_r}
        return 0.5 * (loss_r + loss_f), grads, float(_sigmoid(lr_).mean()), float(_sigmoid(lf_).mean())

    def g_loss_and_grads(self, z, noise, std):
        fake, cg = self.G.forward(z)
        logits, cd = self.D.forward(fake + std * noise)
        loss, gl = bce_mean(logits, 1)
        _, dfake = self.D.backward(gl, cd)
        grads, _ = self.G.backward(dfake, cg)
        return loss, grads

    def step(self, images, idx, std, d_after=None):
        """One D update, then one G update. d_after (a package DenseStack):
        after the D update, take D's parameters from it, so that the G update
        is judged on the very D the package produced (see test_step)."""
        c = self.config
        B, dt = c.batch_size, self.dtype
        real = (images[idx].astype(np.float64) / 127.5 - 1).astype(dt).astype(self.compute)
        z = box_muller(self.rng, (2 * B, c.latent_dim), dt).astype(self.compute)
        noise = (box_muller(self.rng, (3 * B, c.image_dim), dt) if std > 0
                 else np.zeros((3 * B, c.image_dim), dt)).astype(self.compute)
        d_loss, d_grads, d_real, d_fake = self.d_loss_and_grads(real, z[:B], noise[:2 * B], std)
        self.D.adam(d_grads, c.lr, c.beta1, c.beta2, c.adam_eps)
        if d_after is not None:
            for name, p in self.D.params().items():
                p[...] = d_after.params[name]
        g_loss, g_grads = self.g_loss_and_grads(z[B:], noise[2 * B:], std)
        self.G.adam(g_grads, c.lr, c.beta1, c.beta2, c.adam_eps)
        self.last_grads = {"D": d_grads, "G": g_grads}  # the step's gradients, before Adam
        return d_loss, g_loss, d_real, d_fake
