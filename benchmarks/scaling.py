"""Time per epoch against the number of images: 10,000 to 60,000 (full Fashion-MNIST).

    python benchmarks/scaling.py        # writes benchmarks/SCALING.md

One epoch of the reference recipe (batch 50, float32, 2 BLAS threads) on the
first N images of full-size Fashion-MNIST (`--data fashion-mnist`), for
several N, in one run. Linear means seconds per 10,000 images stays flat.
The sizes run in rounds (all sizes, then all again), and each row is the
median epoch over the rounds, so that drift on a shared machine hits all
sizes alike.
"""
import argparse
import os
import statistics
import time

from threadpoolctl import threadpool_limits

from mnistgan import Config, Trainer
from mnistgan.data import load_images

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000, 40_000, 60_000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(HERE, "SCALING.md"))
    a = p.parse_args(argv)
    images = load_images("fashion-mnist")
    lines = ["# Epoch time against data size", "",
             f"Command: `python benchmarks/scaling.py` (one epoch each, batch 50, float32, "
             f"{a.threads} BLAS threads, full-size Fashion-MNIST; median of {a.rounds} rounds).", "",
             "| images | steps | seconds | ms/step | s per 10,000 images | rounds (s) |",
             "|---|---|---|---|---|---|"]
    seconds = {n: [] for n in a.sizes}
    steps = {}
    with threadpool_limits(limits=a.threads, user_api="blas"):
        for r in range(a.rounds):
            for n in a.sizes:
                t = Trainer(Config(epochs=1))
                t0 = time.perf_counter()
                t.fit(images[:n])
                seconds[n].append(time.perf_counter() - t0)
                steps[n] = t.step
                print(f"round {r + 1}: {n:,} images, {seconds[n][-1]:.1f} s", flush=True)
    for n in a.sizes:
        s = statistics.median(seconds[n])
        row = (f"| {n:,} | {steps[n]:,} | {s:.1f} | {1000 * s / steps[n]:.1f} | {s * 10_000 / n:.2f} | "
               f"{', '.join(f'{x:.1f}' for x in seconds[n])} |")
        print(row)
        lines.append(row)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {a.out}")


if __name__ == "__main__":
    main()
