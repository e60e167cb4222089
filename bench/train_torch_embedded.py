"""Train the PyTorch reference DAN + EAC on the embedded default's images with the embedded
default's trunk and schedule, to compare training dynamics with `fer train` over seeds.

The reference (`../shared/reference/dan_eac.py`, `train_torch.py`) builds a torchvision-layout
trunk and an ExponentialLR; the embedded default uses stage strides [1, 2, 2, 1] (a 4 x 4 feature
map at 64 px), a per-step cosine schedule with linear warm-up and a per-step ramp-up of lambda3. This script builds the same
trunk by changing the reference's strides (parameter shapes do not depend on them) and runs the
same schedule, otherwise it is the reference's training loop (its augmentation, Adam, losses).

  fer data synth --out data/synth64 --difficulty 0.2 --image-size 64 --train 1400 --test 1400 --seed 0
  python3 bench/train_torch_embedded.py data/synth64 --seeds 0,1,2,3,4 --epochs 20

Prints one JSON line per seed (final / best test accuracy, the per-epoch curve) and a summary.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
from torchvision import transforms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--reference", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference"))
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--affinity", type=float, default=1.0)
    ap.add_argument("--partition", type=float, default=1.0)
    ap.add_argument("--consistency", type=float, default=4.0)
    ap.add_argument("--consistency-rampup", type=float, default=5.0, help="epochs of linear lambda3 ramp-up, per step")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.004)
    ap.add_argument("--warmup", type=float, default=1.0, help="linear warm-up, epochs")
    ap.add_argument("--min-lr", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--widths", default="8,16,32,64")
    ap.add_argument("--blocks", default="1,1,1,1")
    ap.add_argument("--strides", default="1,2,2,1")
    ap.add_argument("--no-stem-pool", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.reference))
    import dan_eac as R  # noqa: E402
    from train_torch import load_split  # noqa: E402

    torch.set_num_threads(a.threads)
    widths = [int(v) for v in a.widths.split(",")]
    blocks = [int(v) for v in a.blocks.split(",")]
    strides = [int(v) for v in a.strides.split(",")]
    train_x, train_y = load_split(a.root, "train")
    test_x, test_y = load_split(a.root, "test")
    norm = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    pad = -(-32 * a.size // 224)
    train_tf = transforms.Compose([
        transforms.Resize((a.size, a.size)),
        transforms.RandomHorizontalFlip(),
        transforms.RandomApply([transforms.RandomRotation(20), transforms.RandomCrop(a.size, padding=pad)], p=0.2),
        transforms.ToTensor(), norm,
        transforms.RandomErasing(scale=(0.02, 0.25)),
    ])
    eval_tf = transforms.Compose([transforms.Resize((a.size, a.size)), transforms.ToTensor(), norm])
    test_t = torch.stack([eval_tf(im) for im in test_x])
    steps = len(train_x) // a.batch
    finals = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        model = R.build_dan_eac(widths, blocks, num_heads=a.heads, num_classes=7)
        trunk = model.features
        # Sequential: conv1, bn1, relu, maxpool, layer1..layer4.
        if a.no_stem_pool:
            trunk[3] = torch.nn.Identity()
        for stage in range(4):
            first = trunk[4 + stage][0]
            s = strides[stage]
            first.conv1.stride = (s, s)
            if first.downsample is not None:
                first.downsample[0].stride = (s, s)
            else:
                assert s == 1, "a stride-2 block without a projection"
        aff = R.AffinityLoss(7, widths[-1])
        opt = R.make_adam(model, aff, a.lr)
        total = a.epochs * steps
        warm = a.warmup * steps

        def rate(t):  # t = steps completed after this one (1-based), as fer's schedule
            if t <= warm:
                return t / warm
            p = min(1.0, (t - warm) / max(1.0, total - warm))
            return (a.min_lr + (a.lr - a.min_lr) * 0.5 * (1 + math.cos(math.pi * p))) / a.lr

        ramp = a.consistency_rampup * steps
        curve = []
        t0 = time.time()
        t = 0
        for epoch in range(a.epochs):
            perm = torch.randperm(len(train_x), generator=g)
            for i in range(0, len(perm) - a.batch + 1, a.batch):
                t += 1
                for group in opt.param_groups:
                    group["lr"] = a.lr * rate(t)
                idx = perm[i:i + a.batch]
                x = torch.stack([train_tf(train_x[j]) for j in idx.tolist()])
                lam3 = a.consistency * min(1.0, t / ramp) if ramp > 0 else a.consistency
                w = R.LossWeights(a.affinity, a.partition, lam3)
                R.train_step(model, aff, opt, x, train_y[idx], w)
            model.eval()
            with torch.no_grad():
                pred = torch.cat([model(test_t[i:i + 256])[0].argmax(1) for i in range(0, len(test_t), 256)])
            curve.append(round((pred == test_y).float().mean().item(), 4))
        finals.append(curve[-1])
        print(json.dumps({"impl": "pytorch", "seed": seed, "heads": a.heads, "consistency": a.consistency,
                          "final": curve[-1], "best": max(curve), "curve": curve,
                          "seconds": round(time.time() - t0, 1)}), flush=True)
    sd = statistics.stdev(finals) if len(finals) > 1 else 0.0
    print(json.dumps({"impl": "pytorch", "summary": True, "n": len(finals),
                      "final_mean": round(statistics.mean(finals), 4), "final_std": round(sd, 4)}), flush=True)


if __name__ == "__main__":
    main()
