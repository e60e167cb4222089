#!/usr/bin/env python3
"""`just gpu-check`: everything the GPU path promises, checked on a machine with an NVIDIA GPU, in
one run with one summary at the end.

1. the PyTorch parity fixtures on the GPU (`fer parity fixtures --device cuda`, the tolerance
   rules of the fixtures' README §6), with TF32 off (NVIDIA_TF32_OVERRIDE=0);
2. one short thesis-size training run: ResNet-18, 224 px, batch 64, synthetic faces at 224 px,
   2 epochs (`fer train`), its loss falling and its throughput;
3. `fer bench train --device cuda` next to the same step in PyTorch on the same GPU
   (`bench/bench_torch_cuda.py`), at 224 px with batch 64 and 16.

    python3 bench/gpu/check.py [--fer PATH]      # or: just gpu-check

The `fer` binary must be a `--features cuda` build: `--fer`, else target/cuda/release/fer (what
`just build-cuda` writes), else it is built here when cargo is on PATH. A GPU machine without a
Rust toolchain runs a binary built elsewhere (`just build-cuda` works without a GPU). The CUDA
libraries are looked up in PyTorch's `nvidia` wheels when LD_LIBRARY_PATH does not have them.
With $OUT set, the raw outputs and summary.json are written there.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def cuda_library_path():
    """LD_LIBRARY_PATH with the CUDA libraries of PyTorch's nvidia wheels added."""
    dirs = []
    for base in sys.path:
        for pattern in ("nvidia/cu13/lib", "nvidia/cudnn/lib", "nvidia/*/lib"):
            dirs += [d for d in glob.glob(os.path.join(base, pattern)) if os.path.isdir(d)]
    old = os.environ.get("LD_LIBRARY_PATH", "")
    return ":".join(dict.fromkeys(dirs + ([old] if old else [])))


def run(cmd, timeout, env=None, log=None):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {timeout} s", 124
    except OSError as e:
        out, rc = f"{cmd[0]}: {e}", 127
    if log:
        with open(log, "w") as f:
            f.write(f"$ {' '.join(cmd)}\n{out}")
    return rc, out, time.time() - t0


def json_lines(text):
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


TRAIN_CONFIG = """\
model:
  backbone: {arch: resnet18}
  heads: 4
  classes: 7
data: {kind: synthetic, difficulty: 0.2, image_size: 224, train: 1280, test: 320, seed: 0, balance: balanced}
input_size: 224
optimizer: {kind: adam, lr: 0.0001, weight_decay: 0.0}
schedule: {kind: exponential, gamma: 0.6}
epochs: 2
batch: 64
device: cuda
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--fer", help="a --features cuda build of fer")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per benchmark setting")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="fer-gpu-check-")
    os.makedirs(out_dir, exist_ok=True)
    summary = {"checks": {}}

    fer = args.fer or os.path.join(ROOT, "target", "cuda", "release", "fer")
    if not os.path.isfile(fer):
        if shutil.which("cargo"):
            rc, out, _ = run([os.path.join(ROOT, "bench", "gpu", "build.sh")], 3600,
                             log=os.path.join(out_dir, "build.log"))
            if rc != 0:
                print(out[-3000:])
                sys.exit("gpu-check: building the CUDA binary failed (build.log)")
        else:
            sys.exit(f"gpu-check: no CUDA build of fer at {fer} and no cargo here: build it with "
                     "`just build-cuda` on any Linux x86-64 machine and pass --fer PATH")
    env = dict(os.environ, LD_LIBRARY_PATH=cuda_library_path())

    rc, out, _ = run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                      "--format=csv,noheader"], 30)
    summary["gpu"] = out.strip() if rc == 0 else f"nvidia-smi failed: {out.strip()[:200]}"
    print(f"GPU: {summary['gpu']}", flush=True)

    # 1. Parity fixtures on the GPU, at full float32: cuDNN and cuBLAS use TF32 tensor cores for
    # float32 on Ampere and later unless told not to (as PyTorch's cuDNN convolutions do by
    # default), ~1e-3 relative error, past the fixtures' float32 tolerance (an H200: 286 of 1196
    # tensors out of tolerance with TF32, all within without).
    rc, out, secs = run([fer, "parity", "fixtures", "--device", "cuda"], 600,
                        dict(env, NVIDIA_TF32_OVERRIDE="0"), os.path.join(out_dir, "parity.log"))
    lines = [l for l in out.splitlines() if "within tolerance" in l or "FAIL" in l or "error" in l]
    summary["checks"]["parity"] = {"ok": rc == 0, "lines": lines, "seconds": round(secs, 1)}
    print("\n".join(lines) or out[-2000:], flush=True)

    # 2. A short thesis-size training run.
    cfg = os.path.join(out_dir, "train224.yaml")
    with open(cfg, "w") as f:
        f.write(TRAIN_CONFIG)
    # The run's folder (checkpoints, ~90 MB) outside out_dir, which keeps logs and the summary.
    run_dir = os.path.join(tempfile.mkdtemp(prefix="fer-gpu-check-run-"), "train224")
    rc, out, secs = run([fer, "train", "--quiet", "--config", cfg, "--out", run_dir], 900, env,
                        os.path.join(out_dir, "train.log"))
    epochs = [e for e in json_lines(out) if e.get("event") == "epoch"]
    train = {"ok": rc == 0 and len(epochs) == 2, "seconds": round(secs, 1), "epochs": [
        {k: e.get(k) for k in ("epoch", "loss_total", "train_accuracy", "test_accuracy",
                               "train_img_per_s")} for e in epochs]}
    if rc != 0:
        train["error"] = out[-1500:]
    summary["checks"]["train_224_b64"] = train
    print(json.dumps(train), flush=True)

    # 3. Throughput next to PyTorch on the same GPU.
    settings = "r18_224_b64,r18_224_b16"
    bench = {}
    for name in settings.split(","):
        rc, out, _ = run([fer, "bench", "train", "--device", "cuda", "--settings", name, "--steps",
                          str(args.steps), "--reference", "/nonexistent"], 900, env,
                         os.path.join(out_dir, f"bench_fer_{name}.log"))
        rows = json_lines(out)
        bench[name] = {"fer": rows[-1] if rows else {"error": out[-800:]}}
    rc, out, _ = run([sys.executable, os.path.join(ROOT, "bench", "bench_torch_cuda.py"),
                      "--settings", settings, "--steps", str(args.steps)], 900, None,
                     os.path.join(out_dir, "bench_torch.log"))
    for row in json_lines(out):
        bench.setdefault(row["setting"], {})["pytorch"] = row
    if rc != 0:
        for name in settings.split(","):
            bench.setdefault(name, {})["pytorch"] = {"error": out[-800:]}
    summary["checks"]["bench"] = bench

    # Summary.
    print("\n== gpu-check summary ==")
    print(f"GPU: {summary['gpu']}")
    p = summary["checks"]["parity"]
    print(f"parity fixtures on cuda: {'PASS' if p['ok'] else 'FAIL'} ({len(p['lines'])} lines, {p['seconds']} s)")
    t = summary["checks"]["train_224_b64"]
    if t["epochs"]:
        e = t["epochs"][-1]
        first = t["epochs"][0]
        print(f"train ResNet-18 224 px batch 64, 2 epochs: {'PASS' if t['ok'] else 'FAIL'}; loss "
              f"{first['loss_total']:.3f} -> {e['loss_total']:.3f}, test accuracy {e['test_accuracy']:.3f}, "
              f"{e['train_img_per_s']:.1f} img/s")
    else:
        print(f"train ResNet-18 224 px batch 64: FAIL ({t.get('error', '')[-300:]})")
    for name, r in bench.items():
        f, pt = r.get("fer", {}), r.get("pytorch", {})
        ratio = ""
        if "train_img_per_s" in f and "train_img_per_s" in pt:
            ratio = (f"  fer/pytorch train {f['train_img_per_s'] / pt['train_img_per_s']:.2f}x, "
                     f"inference {f['infer_img_per_s'] / pt['infer_img_per_s']:.2f}x")
        print(f"bench {name}: fer train {f.get('train_img_per_s', '-')} / infer {f.get('infer_img_per_s', '-')} img/s; "
              f"pytorch train {pt.get('train_img_per_s', '-')} / infer {pt.get('infer_img_per_s', '-')} img/s{ratio}")
    with open(os.path.join(out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    print(f"outputs in {out_dir}")
    ok = summary["checks"]["parity"]["ok"] and summary["checks"]["train_224_b64"]["ok"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
