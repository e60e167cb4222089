#!/usr/bin/env python3
"""Per-layer convolution times, ours against PyTorch's, at one ResNet-18 + DAN-head setting.

For each layer `conv_probe` lists (stem, the four stages' convolutions, the DAN heads'), the
forward, the weight gradient and the input gradient: ours from the `conv_probe` example
(best of its repeats; backward products timed by `FER_OP_TIMES` slots), PyTorch's from
`torch.nn.functional.conv2d` and `aten::convolution_backward` with one output mask at a time
(best of 8). It shows which layer and which product a whole-step ratio hides: the step's
convolutions are ~80 % of a training step.

    cargo build --release -p fer-model --example conv_probe
    python3 bench/compare_conv_layers.py [--size 112] [--batch 16] [--threads 2]

Both sides use the same thread count (RAYON_NUM_THREADS / torch.set_num_threads). Noisy machines:
run it twice and compare the two tables.
"""
import argparse
import os
import re
import subprocess
import sys
import time


def layers(size):
    s = size // 4
    f = -(-s // 8)
    return [
        ("stem 7x7/2", 3, 64, (7, 7), 2, (3, 3), size),
        ("layer1 3x3", 64, 64, (3, 3), 1, (1, 1), s),
        ("layer2 3x3/2", 64, 128, (3, 3), 2, (1, 1), s),
        ("layer2 3x3", 128, 128, (3, 3), 1, (1, 1), s // 2),
        ("layer2 1x1/2", 64, 128, (1, 1), 2, (0, 0), s),
        ("layer3 3x3/2", 128, 256, (3, 3), 2, (1, 1), s // 2),
        ("layer3 3x3", 256, 256, (3, 3), 1, (1, 1), s // 4),
        ("layer4 3x3/2", 256, 512, (3, 3), 2, (1, 1), s // 4),
        ("layer4 3x3", 512, 512, (3, 3), 1, (1, 1), f),
        ("head 1x1", 512, 256, (1, 1), 1, (0, 0), f),
        ("head 3x3", 256, 512, (3, 3), 1, (1, 1), f),
        ("head 1x3", 256, 512, (1, 3), 1, (0, 1), f),
        ("head 3x1", 256, 512, (3, 1), 1, (1, 0), f),
    ]


def ours(probe, size, batch, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), FER_OP_TIMES="1")
    fwd = subprocess.run([probe, str(size), str(batch)], env=env, capture_output=True, text=True, check=True).stdout
    bwd = subprocess.run([probe, str(size), str(batch), "", "backward"], env=env, capture_output=True, text=True,
                         check=True).stdout
    out = {}
    for line in fwd.splitlines():
        m = re.match(r"(.{14}) .*GFLOP/s,\s+([\d.]+) ms", line)
        if m:
            out.setdefault(m.group(1).strip(), {})["fwd"] = float(m.group(2))
    for line in bwd.splitlines():
        m = re.match(r"(.{14}) .*weight gradient\s+[\d.]+ GFLOP/s\s+([\d.]+) ms, input gradient\s+[\d.]+ GFLOP/s\s+"
                     r"([\d.]+) ms", line)
        if m:
            out.setdefault(m.group(1).strip(), {}).update(wgrad=float(m.group(2)), igrad=float(m.group(3)))
    return out


def pytorch(size, batch, threads):
    import torch
    torch.set_num_threads(threads)

    def best(fn, n=8):
        fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    out = {}
    for name, c, o, k, st, pad, side in layers(size):
        x = torch.randn(batch, c, side, side)
        w = torch.randn(o, c, *k) * 0.1
        g = torch.randn_like(torch.nn.functional.conv2d(x, w, None, st, pad))

        def back(mask):
            return torch.ops.aten.convolution_backward(g, x, w, None, [st, st], list(pad), [1, 1], False, [0, 0], 1,
                                                       mask)
        out[name] = {
            "fwd": best(lambda: torch.nn.functional.conv2d(x, w, None, st, pad)),
            "wgrad": best(lambda: back([False, True, False])),
            "igrad": best(lambda: back([True, False, False])),
        }
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe", default="target/release/examples/conv_probe")
    a = ap.parse_args(argv)
    if not os.path.exists(a.probe):
        sys.exit(f"{a.probe}: not built (cargo build --release -p fer-model --example conv_probe)")
    us, pt = ours(a.probe, a.size, a.batch, a.threads), pytorch(a.size, a.batch, a.threads)
    print(f"{a.size} px, batch {a.batch}, {a.threads} threads; ms ours / PyTorch (PyTorch's time over ours: > 1 is ours faster)\n")
    print("| layer | forward | weight gradient | input gradient |")
    print("|---|---|---|---|")
    for name, *_ in layers(a.size):
        cells = []
        for key in ("fwd", "wgrad", "igrad"):
            u, p = us.get(name, {}).get(key), pt[name][key]
            cells.append(f"{u:.2f} / {p:.2f} ({p / u:.2f})" if u else f"- / {p:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
