#!/usr/bin/env python3
"""`fer predict` against the official DAN inference pipeline on whole photos.

The official demo (and the test transform of DAN's and EAC's training scripts) is
    PIL.Image.open(path).convert('RGB') -> transforms.Resize((224, 224)) -> ToTensor -> Normalize
    -> model.eval() -> softmax(logits).
This script builds DAN-format checkpoints (the official `{'iter', 'model_state_dict'}` layout,
ResNet-18 trunk, 4 heads, 7 classes) with formula-initialised weights (fixtures/backbones/README.md §1;
different salts give different networks, and the fc is scaled so that the top class has p in
(0.4, 0.95), neither flat nor saturated), runs that pipeline with the reference model (bench/reference/dan_eac.py, a copy of ../shared/reference/dan_eac.py), runs
`fer predict CHECKPOINT PHOTO --json`, and prints the largest probability difference per photo.

It also separates the two sources of difference the issue names: resizing (compared on a PNG of
PIL's own decode, so both sides start from the same pixels) and JPEG decoding (the JPEG itself,
decoded by libjpeg in PIL and by the `image` crate in fer), and prints the decoders' pixel difference.

    python3 bench/official_pipeline.py --fer target/debug/fer

Needs torch, torchvision, Pillow, numpy.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "fixtures", "pretrained"))
from generate import fi_fill  # noqa: E402  (the formula initialisation)


def official_probs(model, path):
    tf = transforms.Compose([
        transforms.Resize((224, 224)),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ])
    x = tf(Image.open(path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        logits = model(x)[0]
    return torch.softmax(logits, dim=1)[0].numpy()


def fer_probs(fer, ckpt, path):
    out = subprocess.run([fer, "predict", ckpt, path, "--json", "--classes", "raf_db"],
                         check=True, capture_output=True, text=True).stdout
    face = json.loads(out.strip().splitlines()[-1])["faces"][0]
    names = ["surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral"]
    probs = face["probabilities"]
    return np.array([probs[n] for n in names])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fer", default=os.path.join(HERE, "..", "target", "debug", "fer"))
    ap.add_argument("--reference", default=os.path.join(HERE, "reference"))
    ap.add_argument("--photos", nargs="*", default=[
        os.path.join(HERE, "..", "fixtures", "faces", "grace_hopper_512x512.jpg"),
        os.path.join(HERE, "..", "fixtures", "faces", "astronaut.png"),
    ])
    ap.add_argument("--models", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, args.reference)
    import dan_eac

    tmp = tempfile.mkdtemp(prefix="fer-official-")
    inputs = []
    for p in args.photos:
        inputs.append((os.path.basename(p), p))
        if p.lower().endswith((".jpg", ".jpeg")):
            # PIL's decode, stored losslessly: the resize comparison without the decoder's part.
            png = os.path.join(tmp, os.path.basename(p) + ".pil-decoded.png")
            Image.open(p).convert("RGB").save(png)
            inputs.append((os.path.basename(p) + " (PIL-decoded PNG)", png))
    worst = 0.0
    rows = []
    for m in range(args.models):
        torch.manual_seed(m)
        model = dan_eac.build_dan_eac(num_heads=4, num_classes=7)
        fi_fill(model, 100 + m)
        model.eval()
        # Scale the classifier so the top class has p in (0.4, 0.95) on the first photo: a
        # saturated softmax would hide differences in the logits.
        base = model.fc.weight.detach().clone()
        for scale in [2.0 ** -k for k in range(16)]:
            with torch.no_grad():
                model.fc.weight.copy_(base * scale)
            if 0.4 < official_probs(model, inputs[0][1]).max() < 0.95:
                break
        ckpt = os.path.join(tmp, f"dan_fi_{m}.pth")
        torch.save({"iter": 0, "model_state_dict": model.state_dict()}, ckpt)
        for label, path in inputs:
            p_off = official_probs(model, path)
            p_fer = fer_probs(args.fer, ckpt, path)
            d = float(np.abs(p_off - p_fer).max())
            same_top = int(p_off.argmax() == p_fer.argmax())
            rows.append((m, label, d, float(p_off.max()), same_top))
            if "PIL-decoded" in label or not label.lower().endswith((".jpg", ".jpeg")):
                worst = max(worst, d)
    print(f"{'model':>5}  {'input':<44} {'max |dp|':>10} {'top p':>7} same top")
    for m, label, d, top, same in rows:
        print(f"{m:>5}  {label:<44} {d:>10.2e} {top:>7.3f} {'yes' if same else 'NO'}")
    print(f"largest difference with the same decoded pixels: {worst:.2e}")
    for p in args.photos:
        if p.lower().endswith((".jpg", ".jpeg")):
            pil = np.asarray(Image.open(p).convert("RGB"), dtype=np.int32)
            from_fer = os.path.join(tmp, "fer-decoded.png")
            subprocess.run([args.fer, "data", "decode", p, from_fer], check=True)
            ours = np.asarray(Image.open(from_fer).convert("RGB"), dtype=np.int32)
            diff = np.abs(pil - ours)
            print(f"JPEG decoding, {os.path.basename(p)}: fer vs PIL (libjpeg): "
                  f"{(diff > 0).mean() * 100:.2f} % of values differ, max {diff.max()}/255, "
                  f"mean {diff.mean():.4f}/255")


if __name__ == "__main__":
    main()
