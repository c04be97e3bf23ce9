"""Process CPU time of the demo model's Predictor parts and of one decode step, for before/after comparisons
on a shared machine (CPU time with one thread is far less disturbed by other processes than wall time).

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/cpu_micro.py [--threads 1]

Prints JSON: per part the min and median ms over its runs; decode = (generate 33 tokens − 1 token) / 32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    from photon_core.inference.generate import generate
    from photon_core.inference.predictor import Predictor
    from photon_core.io.preprocess import prepare
    from photon_core.io.volume import load_volume

    torch.set_num_threads(args.threads)
    p = Predictor(None, device="cpu")
    prep = prepare(load_volume(ROOT / "sample_cases/abdomen_ct/ct.nii.gz"), p.device)
    prior = prepare(load_volume(ROOT / "sample_cases/chest_aorta_ct/ct.nii.gz"), p.device)
    res = {}

    def run(name, fn, n):
        ts = []
        for _ in range(n):
            t = time.process_time()
            fn()
            ts.append(time.process_time() - t)
        res[name] = dict(min_ms=round(1000 * min(ts), 2), median_ms=round(1000 * statistics.median(ts), 2))
        return statistics.median(ts)

    q = "Is there a lesion in the liver?"
    run("set_volume", lambda: p.set_volume(prep), 5)
    run("ask", lambda: p.ask(q), 15)
    run("ask_25pct", lambda: p.ask(q, budget="25%"), 15)
    run("ask_many_3_budgets", lambda: p.ask_many("Is the spleen enlarged?", ["auto", "25%", "full"]), 8)
    ids = torch.tensor([p.tokenizer.prompt(q, p.features.shape[0])[0]])
    kw = dict(features=p.features, grid_thw=p.grid_thw, budget="auto")
    t1 = run("generate_1", lambda: generate(p.model, ids, max_new_tokens=1, **kw), 8)
    t33 = run("generate_33", lambda: generate(p.model, ids, max_new_tokens=33, **kw), 8)
    res["decode_per_token_ms"] = round(1000 * (t33 - t1) / 32, 3)
    p.set_volume(prep, prior=prior)
    run("ask_with_prior", lambda: p.ask("Has the liver lesion grown since the prior scan?"), 8)
    res["threads"] = args.threads
    print(json.dumps(res))


if __name__ == "__main__":
    main()
