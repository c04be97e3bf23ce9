"""CPU (or GPU) latency of the demo model through the Predictor: set_volume, ask, re-ask at another budget,
the same with a prior scan in the prompt, and the app's path (sample case → first answer + 3-D; budget
change → new answer + 3-D).

    python bench/cpu_latency.py [--model DIR] [--device cpu] [--repeats 5]

Measures and prints (medians; memory as the process's peak resident set size after each part,
so each figure includes the parts before it); it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def med(xs):
    return round(statistics.median(xs), 3)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import torch

    from app.service import Engine, Settings
    from app.view import Files, build_view, scene_file, slices_file
    from photon_core.inference.predictor import Predictor, peak_rss_mb
    from photon_core.io.preprocess import prepare
    from photon_core.io.volume import load_volume
    from photon_core.model.budget import Budget

    torch.set_num_threads(max(1, torch.get_num_threads()))
    memory = dict(after_imports_mb=round(peak_rss_mb(), 1))
    q = "Is there a lesion in the liver?"
    rows = {}
    pred = Predictor(args.model, device=args.device)
    vol = load_volume(ROOT / "sample_cases/abdomen_ct/ct.nii.gz")
    prep = prepare(vol, pred.device)
    t_set, t_first, t_again, t_budget = [], [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        pred.set_volume(prep)
        t_set.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.ask(q)
        t_first.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.ask(q)
        t_again.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.ask(q, budget="25%")
        t_budget.append(time.perf_counter() - t)
    rows["predictor"] = dict(set_volume_s=med(t_set), first_ask_s=med(t_first),
                             set_volume_plus_first_ask_s=med([a + b for a, b in zip(t_set, t_first)]),
                             ask_again_s=med(t_again), reask_other_budget_s=med(t_budget))
    memory["after_predictor_rows_mb"] = round(peak_rss_mb(), 1)
    prior = prepare(load_volume(ROOT / "sample_cases/chest_aorta_ct/ct.nii.gz"), pred.device)
    t_pair, t_pair_ask = [], []
    for _ in range(args.repeats):          # a follow-up: prior + current (2,000 visual tokens) per question
        t = time.perf_counter()
        pred.set_volume(prep, prior=prior)
        t_pair.append(time.perf_counter() - t)
        t = time.perf_counter()
        pred.ask("Has the liver lesion grown since the prior scan?")
        t_pair_ask.append(time.perf_counter() - t)
    rows["with_prior"] = dict(set_volume_with_prior_s=med(t_pair), ask_s=med(t_pair_ask))
    memory["after_prior_rows_mb"] = round(peak_rss_mb(), 1)
    eng = Engine(Settings(model_dir=args.model, device=args.device))
    _ = eng.predictor                      # load the model before timing
    first, change = [], []
    with tempfile.TemporaryDirectory() as tmp:
        files = Files(Path(tmp))
        for i in range(args.repeats):       # the app's path: load, 3-D anatomy once, per answer the overlay
            eng._cache.clear()
            t = time.perf_counter()
            s = eng.load_case("abdomen_ct")
            view = build_view(s, files)
            eng.answer(s, q, Budget("auto"))
            scene_file(view, s)
            slices_file(view, s, 400, 40, 0.35)
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            eng.answer(s, q, Budget("ratio", 0.1 + 0.05 * i))
            scene_file(view, s)
            slices_file(view, s, 400, 40, 0.35)
            change.append(time.perf_counter() - t)
    rows["app_path"] = dict(sample_case_to_first_answer_and_3d_s=med(first),
                            budget_change_to_answer_and_3d_s=med(change))
    memory["after_app_path_mb"] = round(peak_rss_mb(), 1)
    rows["peak_rss"] = memory
    rows["machine"] = dict(device=str(pred.device), cpu_threads=torch.get_num_threads(),
                           torch=torch.__version__, python=platform.python_version(),
                           processor=platform.processor() or platform.machine(), model=pred.name,
                           repeats=args.repeats)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
