"""The speed suite: mnistgan against NumPy and PyTorch, measured in one run.

    python benchmarks/speed.py                 # full table, written to benchmarks/RESULTS.md
    python benchmarks/speed.py --quick         # fewer rounds, for a look

PyTorch is optional: `pip install ".[bench]"` (torch==2.13.0, the CPU build).

What it measures, all in one process run:
  1. ms per training step (median and interquartile range), batch 50, for
     mnistgan, the NumPy reference step (tests/numpy_reference.py) and
     PyTorch eager (same model, same initial weights, same batch), at 1 and
     2 BLAS/intra-op threads, float32 and float64. The configurations run in
     short blocks, round-robin, so drift on a shared machine hits all alike.
  2. The GEMM-only time of the step (its 38 GEMMs, same shapes, same BLAS,
     one at a time), where mnistgan's step goes pass by pass, what the work
     around the GEMMs costs kernel by kernel, and the same GEMMs through
     PyTorch (torch.mm), to tell whether PyTorch loses its time in its GEMMs
     or around them. "mnistgan-blas-threads" is mnistgan without its helper
     thread (parallel=False): every GEMM on OpenBLAS's own threads.
  3. Images per second of mnistgan at batch 50, 100, 256 and 1024.
  4. Peak memory (max RSS) of each implementation, each in a fresh process.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from step import GemmOnly, step_gemms  # noqa: E402

from mnistgan import GAN, Config  # noqa: E402
from numpy_reference import RefGAN  # noqa: E402

import importlib.util

# PyTorch is optional and heavy: imported only where it is used.
HAVE_TORCH = importlib.util.find_spec("torch") is not None
torch = None


def _torch():
    global torch
    if torch is None:
        import torch as t
        torch = t
    return torch


# -- PyTorch: the same model -----------------------------------------------------------

class TorchGAN:
    """The reference recipe in PyTorch eager, started from a mnistgan GAN's weights."""

    def __init__(self, gan: GAN, seed: int = 0):
        torch = _torch()
        c = gan.config
        self.c = c
        dt = torch.float32 if c.dtype == "float32" else torch.float64
        torch.manual_seed(seed)

        def linear(net, i):
            W = net.params[f"dense{i}.weight"]
            layer = torch.nn.Linear(W.shape[0], W.shape[1]).to(dt)
            with torch.no_grad():
                layer.weight.copy_(torch.from_numpy(W.T.copy()))
                layer.bias.copy_(torch.from_numpy(net.params[f"dense{i}.bias"].copy()))
            return layer

        g_layers = []
        for i in range(gan.G.n_layers):
            g_layers.append(linear(gan.G, i))
            if i < gan.G.n_layers - 1:
                g_layers += [torch.nn.ReLU(), torch.nn.BatchNorm1d(gan.G.sizes[i + 1], momentum=c.bn_momentum,
                                                                   eps=c.bn_eps).to(dt)]
        g_layers.append(torch.nn.Tanh())
        d_layers = []
        for i in range(gan.D.n_layers):
            d_layers.append(linear(gan.D, i))
            if i < gan.D.n_layers - 1:
                d_layers.append(torch.nn.ReLU())
        self.G = torch.nn.Sequential(*g_layers)
        self.D = torch.nn.Sequential(*d_layers)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.adam_eps)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=c.lr, betas=(c.beta1, c.beta2), eps=c.adam_eps)
        self.loss = torch.nn.BCEWithLogitsLoss()
        B = c.batch_size
        self.dt = dt
        self.targets_d = torch.cat([torch.ones(B, 1, dtype=dt), torch.zeros(B, 1, dtype=dt)])
        self.targets_g = torch.ones(B, 1, dtype=dt)

    def step(self, images_u8: np.ndarray, idx: np.ndarray, std: float):
        torch = _torch()
        c, B, dt = self.c, self.c.batch_size, self.dt
        real = torch.from_numpy(images_u8[idx]).to(dt) / 127.5 - 1
        z = torch.randn(B, c.latent_dim, dtype=dt)
        fake = self.G(z).detach()
        x = torch.cat([real, fake])
        x = x + std * torch.randn_like(x)
        d_loss = self.loss(self.D(x), self.targets_d)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        z = torch.randn(B, c.latent_dim, dtype=dt)
        fake = self.G(z)
        for p in self.D.parameters():
            p.requires_grad_(False)  # only dX flows back through D
        g_loss = self.loss(self.D(fake + std * torch.randn_like(fake)), self.targets_g)
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        for p in self.D.parameters():
            p.requires_grad_(True)
        self.opt_g.step()
        return d_loss.item(), g_loss.item()


# -- runners ------------------------------------------------------------------------------

def make_runner(impl: str, cfg: Config, images: np.ndarray):
    order = np.random.default_rng(0).permutation(len(images))
    B = cfg.batch_size
    batches = [order[i:i + B].astype(np.int64) for i in range(0, len(images) - B + 1, B)]
    pos = [0]

    def batch():
        pos[0] = (pos[0] + 1) % len(batches)
        return batches[pos[0]]

    gan = GAN(cfg, parallel=impl != "mnistgan-blas-threads")
    if impl in ("mnistgan", "mnistgan-blas-threads"):
        def run():
            gan.train_step(images, batch(), 0.1)
        run.session = gan.session  # a block of steps in one helper session, as Trainer runs an epoch
        return run
    if impl == "numpy":
        ref = RefGAN(gan, seed=1)
        return lambda: ref.step(images, batch(), 0.1)
    if impl == "pytorch":
        tg = TorchGAN(gan)
        return lambda: tg.step(images, batch(), 0.1)
    if impl == "gemm-only":
        return GemmOnly(cfg).step
    if impl == "pytorch-gemm-only":
        return TorchGemmOnly(cfg).step
    raise ValueError(impl)


class TorchGemmOnly:
    """The step's GEMMs alone, through torch.mm (PyTorch's own BLAS) on the
    same operands as GemmOnly: is PyTorch slower in its GEMMs or around them?"""

    def __init__(self, cfg):
        t = _torch()
        self.ops = [(t.from_numpy(A), t.from_numpy(B), t.from_numpy(C), ta, tb)
                    for A, B, C, ta, tb in GemmOnly(cfg).ops]

    def step(self):
        mm = torch.mm
        for A, B, C, ta, tb in self.ops:
            mm(A.t() if ta else A, B.t() if tb else B, out=C)


class Threads:
    """BLAS threads (threadpoolctl) and, once PyTorch is loaded, its intra-op threads."""

    def __init__(self, n):
        self.n = n
        self.limits = None

    def __enter__(self):
        self.limits = threadpool_limits(limits=self.n, user_api="blas")
        self.old = None
        if torch is not None:
            self.old = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        self.limits.restore_original_limits()
        if self.old is not None:
            torch.set_num_threads(self.old)
        # Thread pools (OpenBLAS's, PyTorch's OpenMP) spin for a while after
        # their last task; a short rest keeps them from stealing the next
        # configuration's cores.
        time.sleep(0.05)


def interleaved(configs, rounds, block, warmup):
    """configs: {key: (threads, runner)} -> {key: [seconds per step]}."""
    times = {k: [] for k in configs}
    for k, (threads, run) in configs.items():
        with Threads(threads):
            for _ in range(warmup):
                run()
    for _ in range(rounds):
        for k, (threads, run) in configs.items():
            with Threads(threads), getattr(run, "session", contextlib.nullcontext)():
                for _ in range(block):
                    t0 = time.perf_counter()
                    run()
                    times[k].append(time.perf_counter() - t0)
    return times


def stats(samples):
    ms = [1000 * s for s in samples]
    q = statistics.quantiles(ms, n=4)
    return statistics.median(ms), q[0], q[2]


def pass_breakdown(cfg, images, threads, steps):
    """ms per step spent in each pass of mnistgan's step (each a plan: GEMMs,
    elementwise work and Adam together, shared with the helper thread at 2
    threads) and in each kernel gan.py calls itself."""
    import mnistgan.gan as gan_mod
    from mnistgan import _kernels as K

    spent = collections.defaultdict(float)

    def timing(f, label):
        def timed(*a, **k):
            t0 = time.perf_counter()
            r = f(*a, **k)
            spent[label if isinstance(label, str) else label(*a)] += time.perf_counter() - t0
            return r
        return timed

    labels = {"standard_normal": "standard_normal (z and noise draws, Box-Muller)"}

    class Timed:
        def __getattr__(self, name):
            return timing(getattr(K, name), labels.get(name, name))

    saved = gan_mod.K
    gan_mod.K = Timed()
    try:
        gan = GAN(cfg)
        B = cfg.batch_size

        def timed_method(obj, name, label):
            setattr(obj, name, timing(getattr(obj, name), label))

        timed_method(gan.G, "forward", f"G forward, {2 * B} rows (ForwardPlan)")
        timed_method(gan.D, "forward", lambda x, *a: f"D forward, {x.shape[0]} rows (ForwardPlan)")
        timed_method(gan.D, "backward_and_update", "D backward + Adam (BackwardPlan)")
        timed_method(gan.G, "backward_and_update", f"G backward + Adam, {B} rows (BackwardPlan)")
        timed_method(gan.D, "backward", "D input gradient, G update (BackwardPlan)")
        idx = np.arange(cfg.batch_size, dtype=np.int64)
        with Threads(threads), gan.session():
            for _ in range(5):
                gan.train_step(images, idx, 0.1)
            spent.clear()
            t0 = time.perf_counter()
            for _ in range(steps):
                gan.train_step(images, idx, 0.1)
            total = time.perf_counter() - t0
    finally:
        gan_mod.K = saved
    rows = {k: 1000 * v / steps for k, v in spent.items()}
    rows["python and the rest"] = 1000 * total / steps - sum(rows.values())
    return 1000 * total / steps, rows


def elementwise_costs(cfg, reps=50):
    """ms per step of the work around the GEMMs, each kernel timed alone (one
    thread) on the shapes and counts of one step: what the plans fuse in."""
    from mnistgan import _kernels as K

    dt = np.dtype(cfg.dtype)
    B = cfg.batch_size
    rng = np.random.default_rng(0)
    g_sizes = [*cfg.g_hidden]
    d_sizes = [*cfg.d_hidden]
    z = lambda *shape: rng.standard_normal(shape).astype(dt)  # noqa: E731
    gan = GAN(cfg)
    n_params = gan.G.n_params + gan.D.n_params
    work = collections.defaultdict(list)
    for d in g_sizes:  # G's hidden layers: forward on 2B rows (two groups), backward on B
        x, y, gam, bet = z(2 * B, d), z(2 * B, d), np.ones(d, dt), np.zeros(d, dt)
        rm, rv, mu, istd = np.zeros(d, dt), np.ones(d, dt), np.zeros(d, dt), np.zeros(d, dt)
        xb, gy, gx, dg, dbt = z(B, d), z(B, d), z(B, d), z(d), z(d)
        work["batch norm forward and backward"] += [
            lambda x=x, y=y, gam=gam, bet=bet, rm=rm, rv=rv, mu=mu, istd=istd:
                K.batchnorm_forward(x, gam, bet, rm, rv, mu, istd, y),
            lambda xb=xb, mu=mu, istd=istd, gam=gam, gy=gy, dg=dg, dbt=dbt, gx=gx:
                K.batchnorm_backward(xb, mu, istd, gam, gy, dg, dbt, gx)]
        work["ReLU forward and backward"] += [lambda x=x: K.relu_forward(x, x),
                                              lambda xb=xb, gy=gy, gx=gx: K.relu_backward(xb, gy, gx)]
    for d in d_sizes:  # D's hidden layers: forward on 2B and B rows, backward on 2B and B
        for n in (2 * B, B):
            x, gy, gx = z(n, d), z(n, d), z(n, d)
            work["ReLU forward and backward"] += [lambda x=x: K.relu_forward(x, x),
                                                  lambda x=x, gy=gy, gx=gx: K.relu_backward(x, gy, gx)]
    t, gt, gt2 = z(2 * B, cfg.image_dim), z(B, cfg.image_dim), z(B, cfg.image_dim)
    work["tanh forward and backward"] += [lambda: K.tanh_forward(t, t),
                                          lambda: K.tanh_backward(gt, gt, gt2)]
    logits, probs, dl = z(2 * B, 1), z(2 * B, 1), z(2 * B, 1)
    targets = np.ones((2 * B, 1), dt)
    work["sigmoid + BCE"] += [lambda: K.sigmoid_bce(logits, targets, probs, dl),
                              lambda: K.sigmoid_bce(logits[:B], targets[:B], probs[:B], dl[:B])]
    p_, g_, m_, v_ = (z(n_params) for _ in range(4))
    work["Adam (all parameters, from memory)"] += [
        lambda: K.adam_step(p_, g_, m_, v_, lr=2e-4, beta1=0.5, beta2=0.999, eps=1e-8, step=1)]
    imgs = rng.integers(0, 256, (10000, cfg.image_dim), dtype=np.uint8)
    idx = rng.integers(0, 10000, B)
    real, noise = z(B, cfg.image_dim), z(3 * B, cfg.image_dim)
    work["gather + instance noise"] += [lambda: K.gather_batch(imgs, idx, real),
                                        lambda: K.add_noise(noise[:2 * B], noise[:2 * B], 0.1, noise[:2 * B]),
                                        lambda: K.add_noise(noise[:B], noise[:B], 0.1, noise[:B])]
    draws = np.random.default_rng(1)
    zz = z(2 * B, cfg.latent_dim)
    work["normal draws (z and noise)"] += [lambda: K.standard_normal(draws, zz),
                                           lambda: K.standard_normal(draws, noise)]
    out = {}
    with Threads(1):
        for name, fns in work.items():
            best = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(reps):
                    for f in fns:
                        f()
                best.append((time.perf_counter() - t0) / reps)
            out[name] = 1000 * statistics.median(best)
    return out


def peak_memory(impl, dtype, threads, steps=30):
    """Peak resident memory (VmHWM) in MB of a fresh process that builds the
    model and trains `steps` steps. (Not ru_maxrss: Linux carries it across
    exec, so a child would report its parent's peak.)"""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {HERE!r}); import speed, numpy as np\n"
            f"from mnistgan import Config\n"
            f"cfg = Config(dtype={dtype!r})\n"
            f"images = np.random.default_rng(0).integers(0, 256, (10000, 784), dtype=np.uint8)\n"
            f"with speed.Threads({threads}):\n"
            f"    run = speed.make_runner({impl!r}, cfg, images)\n"
            f"    for _ in range({steps}): run()\n"
            f"print([int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')][0] / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    blas = sorted({f"{i['internal_api']} {i.get('version')} ({i.get('architecture')})"
                   for i in threadpool_info() if i["user_api"] == "blas"})
    return f"{cpu}, {os.cpu_count()} CPUs; BLAS: {'; '.join(blas)}" + (
        f"; PyTorch {_torch().__version__} ({_torch().get_num_threads()} threads by default)"
        if HAVE_TORCH else "; PyTorch not installed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"), help="where to write the table")
    p.add_argument("--no-write", action="store_true", help="print only")
    a = p.parse_args(argv)
    rounds, block = (4, 5) if a.quick else (30, 5)
    images = np.random.default_rng(0).integers(0, 256, (10000, 784), dtype=np.uint8)
    impls = (["mnistgan", "mnistgan-blas-threads", "numpy"] + (["pytorch"] if HAVE_TORCH else []) + ["gemm-only"]
             + (["pytorch-gemm-only"] if HAVE_TORCH else []))
    lines = ["# mnistgan speed results", "",
             f"Machine: {machine()}.", "",
             f"Command: `python benchmarks/speed.py{' --quick' if a.quick else ''}` "
             f"({rounds} rounds x {block} steps per configuration, interleaved; "
             f"{len(step_gemms(Config()))} GEMMs per step).", ""]

    def emit(text=""):
        print(text, flush=True)
        lines.append(text)

    for dtype in ("float32", "float64"):
        cfg = Config(dtype=dtype)
        configs = {(impl, t): (t, make_runner(impl, cfg, images)) for impl in impls for t in (1, 2)
                   if impl != "mnistgan-blas-threads" or t > 1}
        times = interleaved(configs, rounds, block, warmup=3)
        emit(f"## Training step, batch 50, {dtype}")
        emit()
        emit("| threads | implementation | median ms/step | IQR ms | vs mnistgan |")
        emit("|---|---|---|---|---|")
        for t in (1, 2):
            ours = stats(times[("mnistgan", t)])[0]
            for impl in impls:
                if (impl, t) not in times:
                    continue
                med, lo, hi = stats(times[(impl, t)])
                if impl == "mnistgan":
                    ratio = "1.00x"
                elif impl == "gemm-only":
                    ratio = f"mnistgan takes {ours / med:.2f}x its GEMMs"
                elif impl == "pytorch-gemm-only":
                    ratio = f"PyTorch takes {stats(times[('pytorch', t)])[0] / med:.2f}x its GEMMs"
                else:
                    ratio = f"mnistgan is {med / ours:.2f}x faster"
                emit(f"| {t} | {impl} | {med:.2f} | {lo:.2f}-{hi:.2f} | {ratio} |")
        emit()
        if HAVE_TORCH:
            for t in (1, 2):
                torch_ms = stats(times[("pytorch", t)])[0]
                gemm_ms = stats(times[("gemm-only", t)])[0]
                emit(f"- {t} thread(s): a step costing nothing but its GEMMs (through OpenBLAS, one "
                     f"at a time) would be {torch_ms / gemm_ms:.2f}x faster than PyTorch; 2x needs a "
                     f"step of {torch_ms / 2:.2f} ms, {100 * (1 - torch_ms / 2 / gemm_ms):.0f}% under "
                     f"that GEMM-only time.")
            emit()

    emit("## Where mnistgan's step goes (batch 50, float32)")
    emit()
    emit("Each pass is one plan (GEMMs, elementwise work and Adam fused, shared with the "
         "helper thread at 2 threads); the kernels gan.py calls itself are listed apart.")
    emit()
    for t in (1, 2):
        total, rows = pass_breakdown(Config(), images, t, 40 if a.quick else 100)
        emit(f"{t} thread(s): {total:.2f} ms per step:")
        emit()
        emit("| part | ms/step | share |")
        emit("|---|---|---|")
        for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
            emit(f"| {k} | {v:.3f} | {100 * v / total:.1f}% |")
        emit()
    costs = elementwise_costs(Config())
    emit("The work around the GEMMs, each kernel timed alone on one step's shapes (1 thread, "
         "data hot in cache but Adam's 40 MB, which streams from memory):")
    emit()
    emit("| kernel | ms/step |")
    emit("|---|---|")
    for k, v in sorted(costs.items(), key=lambda kv: -kv[1]):
        emit(f"| {k} | {v:.3f} |")
    emit(f"| all of it | {sum(costs.values()):.3f} |")
    emit()

    emit("## mnistgan throughput by batch size (float32)")
    emit()
    emit("| batch | threads | ms/step | images/s |")
    emit("|---|---|---|---|")
    for B in (50, 100, 256, 1024):
        cfg = Config(batch_size=B)
        configs = {t: (t, make_runner("mnistgan", cfg, images)) for t in (1, 2)}
        times = interleaved(configs, max(2, rounds // 3), max(2, block // 2), warmup=2)
        for t in (1, 2):
            med = stats(times[t])[0]
            emit(f"| {B} | {t} | {med:.1f} | {B * 1000 / med:,.0f} |")
    emit()

    emit("## Peak memory (max RSS of a fresh process: imports, model, 30 steps, 10,000 uint8 images)")
    emit()
    emit("| implementation | float32 MB | float64 MB |")
    emit("|---|---|---|")
    for impl in [i for i in impls if i not in ("gemm-only", "pytorch-gemm-only", "mnistgan-blas-threads")]:
        emit(f"| {impl} | {peak_memory(impl, 'float32', 1):.0f} | {peak_memory(impl, 'float64', 1):.0f} |")
    emit()
    if not a.no_write:
        with open(a.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"written to {a.out}")


if __name__ == "__main__":
    main()
