#!/usr/bin/env python3
"""Our benchmark against PyTorch's on this machine, in alternating rounds, and the reference file.

    python3 bench/compare_torch.py --fer target/debug/fer            # 2 rounds, the 4 CPU settings
    python3 bench/compare_torch.py --fer target/debug/fer --rounds 3 --settings r18_112_b16
    python3 bench/compare_torch.py --write bench/pytorch_reference.jsonl   # PyTorch only: refresh
    python3 bench/compare_torch.py --fer target/debug/fer --isa avx2   # both capped at AVX2

Each round runs, per setting, the reference PyTorch benchmark (`bench_torch.py`; the embedded
setting through `bench_torch_embedded.py`) and then `fer bench train` at the same setting, so
both see the same moment of a noisy shared machine. It prints every round's rates and the median
ratio per setting. With --write it replaces this machine's lines of the reference file (other
machines' lines are kept) with PyTorch's medians, tagged with the machine (CPU model and the
instruction-set level, as `fer bench` detects it), which is how `fer bench train` finds them.
`--isa avx2` (or `baseline`) caps both sides on a machine that has more: ours with `FER_ISA`,
PyTorch's own kernels with `ATEN_CPU_CAPABILITY`, oneDNN's (its convolutions) with
`ONEDNN_MAX_CPU_ISA` and MKL's (its matrix products) with `MKL_ENABLE_INSTRUCTIONS`; the
machine's level is then the cap, for the table and for --write.
Needs PyTorch (`pip install torch`).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ["r18_112_b16", "r18_224_b16", "r18_64_b64", "embedded"]


LEVELS = ["baseline", "avx2", "avx512"]
# Per level below AVX-512: the caps of PyTorch's three kernel sources (ATen, oneDNN, MKL).
TORCH_CAPS = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def machine(cap: str = "avx512") -> dict:
    """CPU model and level, by the rule of fer's `ops::isa::detected` (AVX-512 needs F, BW, DQ
    and VL; AVX2 needs AVX, AVX2 and FMA), at most `cap`."""
    model, flags = "unknown", set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx", "avx2", "fma"} <= flags:
        isa = "avx512"
    elif {"avx", "avx2", "fma"} <= flags:
        isa = "avx2"
    else:
        isa = "baseline"
    isa = min(isa, cap, key=LEVELS.index)
    return {"cpu": model, "isa": isa, "cores": os.cpu_count()}


def run_json(cmd: list) -> dict:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    if len(lines) != 1:
        raise RuntimeError(f"{' '.join(cmd)}: expected one JSON line, got {len(lines)}")
    return lines[0]


def torch_round(setting: str, reference: str, threads: int, steps: int) -> dict:
    if setting == "embedded":
        return run_json([sys.executable, os.path.join(HERE, "bench_torch_embedded.py"),
                         "--reference", reference, "--threads", str(threads), "--steps", str(steps)])
    return run_json([sys.executable, os.path.join(reference, "bench_torch.py"), "--settings", setting,
                     "--threads", str(threads), "--steps", str(steps)])


def ours_round(fer: str, setting: str, threads: int, steps: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    out = subprocess.run([fer, "bench", "train", "--settings", setting, "--steps", str(steps),
                          "--reference", os.devnull], stdout=subprocess.PIPE, text=True, check=True,
                         env=env).stdout
    return json.loads(next(l for l in out.splitlines() if l.startswith("{")))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fer", help="our binary; without it only PyTorch runs")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reference", default=os.path.join(HERE, "..", "..", "shared", "reference"),
                    help="folder holding bench_torch.py and dan_eac.py")
    ap.add_argument("--write", help="reference file whose lines for this machine are replaced")
    ap.add_argument("--isa", choices=["avx2", "baseline"],
                    help="cap both implementations at this instruction-set level")
    args = ap.parse_args()
    if args.isa:
        # Inherited by both benchmarks' processes.
        os.environ.update(TORCH_CAPS[args.isa], FER_ISA=args.isa)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown setting(s) {unknown}; known: {', '.join(SETTINGS)}")
    if not os.path.exists(os.path.join(args.reference, "bench_torch.py")):
        ap.error(f"{args.reference}: no bench_torch.py there (give --reference; bench/reference has a copy of dan_eac.py only)")
    here = machine(args.isa or "avx512")
    print(f"machine: {here['cpu']}, {here['isa']}, {here['cores']} cores; {args.threads} threads",
          file=sys.stderr)

    torch_runs = {s: [] for s in settings}
    our_runs = {s: [] for s in settings}
    for r in range(args.rounds):
        for s in settings:
            t = torch_round(s, args.reference, args.threads, args.steps)
            torch_runs[s].append(t)
            line = f"round {r + 1} {s:<12} PyTorch train {t['train_img_per_s']:>8.2f} infer {t['infer_img_per_s']:>8.2f}"
            if args.fer:
                o = ours_round(args.fer, s, args.threads, args.steps)
                our_runs[s].append(o)
                line += (f" | ours train {o['train_img_per_s']:>8.2f} infer {o['infer_img_per_s']:>8.2f}"
                         f" ({o.get('isa', '?')}) | ratio {o['train_img_per_s'] / t['train_img_per_s']:.2f}"
                         f" / {o['infer_img_per_s'] / t['infer_img_per_s']:.2f}")
            print(line, file=sys.stderr, flush=True)

    med = lambda runs, key: statistics.median(x[key] for x in runs)
    if args.fer:
        print("\n| setting | train img/s ours (PyTorch) | train ratio | inference ours (PyTorch) | inference ratio | peak MB ours (PyTorch) |")
        print("|---|---|---|---|---|---|")
        for s in settings:
            t, o = torch_runs[s], our_runs[s]
            ratio = lambda key: statistics.median(a[key] / b[key] for a, b in zip(o, t))
            fmt = lambda runs, key: ", ".join(f"{x[key]:.4g}" for x in runs)
            print(f"| {s} | {fmt(o, 'train_img_per_s')} ({fmt(t, 'train_img_per_s')}) | {ratio('train_img_per_s'):.2f}"
                  f" | {fmt(o, 'infer_img_per_s')} ({fmt(t, 'infer_img_per_s')}) | {ratio('infer_img_per_s'):.2f}"
                  f" | {med(o, 'peak_rss_mb'):.0f} ({med(t, 'peak_rss_mb'):.0f}) |")

    if args.write:
        kept = []
        if os.path.exists(args.write):
            with open(args.write) as f:
                for line in f:
                    if line.strip():
                        v = json.loads(line)
                        m = v.get("machine", {})
                        if not (m.get("cpu") == here["cpu"] and m.get("isa") == here["isa"] and v["setting"] in settings):
                            kept.append(line.rstrip("\n"))
        today = datetime.date.today().isoformat()
        with open(args.write, "w") as f:
            for line in kept:
                f.write(line + "\n")
            for s in settings:
                runs = torch_runs[s]
                f.write(json.dumps({
                    "impl": "pytorch", "setting": s,
                    "train_img_per_s": round(med(runs, "train_img_per_s"), 2),
                    "infer_img_per_s": round(med(runs, "infer_img_per_s"), 2),
                    "peak_rss_mb": round(med(runs, "peak_rss_mb"), 1),
                    "threads": args.threads, "torch": runs[0]["torch"], "channels_last": False,
                    "machine": here,
                    "runs": f"median of {len(runs)} on {today}"
                            + (", alternating with ours" if args.fer else "")
                            + ": train " + " / ".join(str(x["train_img_per_s"]) for x in runs)
                            + ", infer " + " / ".join(str(x["infer_img_per_s"]) for x in runs),
                }) + "\n")
        print(f"wrote {args.write} ({len(settings)} lines for this machine, {len(kept)} kept)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
