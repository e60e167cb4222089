"""The reference PyTorch benchmark (`bench_torch.py` from the shared reference folder) at the
embedded default's setting, which that script does not list: ResNet widths 8/16/32/64, one block
per stage, 48 px, batch 32 (4 heads, 7 classes). Same model code, same timing, same JSON.

    python3 bench/bench_torch_embedded.py [--reference ../shared/reference] [--threads 2] [--steps 5]
"""
import argparse
import json
import os
import sys


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", default=os.path.join(here, "..", "..", "shared", "reference"),
                    help="folder holding bench_torch.py and dan_eac.py")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.reference))
    import bench_torch
    import dan_eac

    bench_torch.SETTINGS["embedded"] = (48, 32)
    dan_eac.RESNET18_WIDTHS = (8, 16, 32, 64)
    dan_eac.RESNET18_BLOCKS = (1, 1, 1, 1)
    print(json.dumps(bench_torch.run_setting("embedded", args.threads, args.steps, False)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
