"""How often a fresh process's first parallel float math comes out at low accuracy (see photon_core.vml).

Each run is a fresh Python process that computes cos of 7,680 float32 values on 2 threads as its first
sizable op (the size of the vision tower's rotary table), and reports the largest error against float64.
Two arms: ``bare`` (torch alone) and ``warmed`` (``import photon_core.model`` first, which warms oneMKL's
vector math up). ``--jobs`` runs several at once (the race is likelier when the CPU is oversubscribed).

    .venv/bin/python scripts/vml_race.py --runs 100 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import torch
torch.set_num_threads(2)
{warm}
x = torch.arange(7680, dtype=torch.float32).reshape(480, 16) % 11 / 3
print(float((x.cos() - x.double().cos().float()).abs().max()))
"""
ARMS = {"bare": "", "warmed": "import photon_core.model"}
BAD = 1e-6            # float32 cos is within 1 ulp (6e-8 here); the low-accuracy kernel is off by ~1e-4


def one(arm: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD.format(warm=ARMS[arm])], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def storm(arm: str, runs: int, jobs: int) -> list[float]:
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda _: one(arm), range(runs)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=40, help="fresh processes per arm")
    ap.add_argument("--jobs", type=int, default=2, help="processes at once")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    args = ap.parse_args(argv)
    result = {}
    for arm in args.arms:
        errors = storm(arm, args.runs, args.jobs)
        bad = [e for e in errors if e > BAD]
        result[arm] = {"runs": len(errors), "low_accuracy": len(bad), "worst": max(errors)}
        print(f"{arm:7s} {len(bad):3d} of {len(errors)} first calls at low accuracy (worst error "
              f"{max(errors):.2e})", flush=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
