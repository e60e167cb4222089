#!/usr/bin/env python3
"""The reference PyTorch DAN + EAC training step and inference on a CUDA GPU, images/s, with the
JSON keys of `fer bench train` (and of the reference `bench_torch.py`, which is CPU-only).

    python3 bench/bench_torch_cuda.py --settings r18_224_b64,r18_224_b16 --steps 20

Same step as `bench_torch.py`: ResNet-18 trunk, 4 heads, 7 classes, erased normalised noise,
train_step with lambda = 1, 1, 4 and Adam 1e-3; inference is one eval forward. Each timing ends
with torch.cuda.synchronize(); the median of the timed steps after 3 warm-up steps is reported.
The model is imported from bench/reference/dan_eac.py (a copy of ../shared/reference/dan_eac.py).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "reference"))
import dan_eac as de  # noqa: E402

SETTINGS = {"r18_224_b64": (224, 64), "r18_224_b16": (224, 16), "r18_112_b16": (112, 16)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", default="r18_224_b64,r18_224_b16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    for name in args.settings.split(","):
        side, batch = SETTINGS[name]
        torch.manual_seed(0)
        model = de.build_dan_eac(de.RESNET18_WIDTHS, de.RESNET18_BLOCKS, 4, 7).to(dev)
        affinity = de.AffinityLoss(7, model.feat_channels).to(dev)
        opt = de.make_adam(model, affinity, lr=1e-3)
        g = torch.Generator().manual_seed(1)
        x = ((torch.rand(batch, 3, side, side, generator=g) - 0.45) / 0.225).to(dev)
        y = torch.randint(0, 7, (batch,), generator=g).to(dev)
        weights = de.LossWeights(affinity=1.0, partition=1.0, consistency=4.0)

        def timed(fn):
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        def train():
            model.train()
            de.train_step(model, affinity, opt, x, y, weights)

        def infer():
            model.eval()
            with torch.inference_mode():
                model(x)

        t_train, t_infer = timed(train), timed(infer)
        print(json.dumps({"impl": "pytorch", "setting": name, "device": str(dev),
                          "gpu": torch.cuda.get_device_name(dev),
                          "train_img_per_s": round(batch / t_train, 2),
                          "infer_img_per_s": round(batch / t_infer, 2),
                          "torch": torch.__version__,
                          "cudnn": torch.backends.cudnn.version()}), flush=True)


if __name__ == "__main__":
    main()
