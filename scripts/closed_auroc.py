"""Does the model read the image for yes/no questions? A diagnostic that measures and prints.

For every existence / anomaly-detection question of the demo generator's scans, the margin
log P("yes") − log P("no") of the first answer token, and the AUROC of that margin against the
truth. Accuracy alone hides a model that answers the prior ("no" everywhere scores 0.91 on an
unbalanced set); AUROC 0.5 means the answer does not depend on the scan at all.

    python scripts/closed_auroc.py --scans 24                       # shipped model, test split
    python scripts/closed_auroc.py --model runs/x/model --downsample 2.5
"""
from __future__ import annotations

import argparse

import torch

from photon_core.data import DemoGenerator
from photon_core.metrics import auroc
from photon_core.predictor import Predictor
from photon_core.prompt import batch_prompts
from photon_core.scheduler import Budget

FAMILIES = ("existence", "anomaly_detection")


def margins(predictor: Predictor, gen: DemoGenerator, scans: int, budget: str) -> dict:
    tok, model = predictor.tokenizer, predictor.model
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    out = {f: ([], []) for f in FAMILIES}
    for _ in range(scans):
        frames, qa, _, _ = gen.sample()
        predictor.set_volume(frames)
        qs = [q for q in qa if q["family"] in FAMILIES]
        if not qs:
            continue
        V = predictor.features.shape[0]
        ids, mask, _ = batch_prompts([tok.prompt(q["question"], V)[0] for q in qs], model.config.pad_token_id)
        with torch.inference_mode():
            res = model(ids, mask, features=predictor.features.repeat(len(qs), 1), grid_thw=predictor.grid_thw,
                        budget=[Budget.parse(budget)] * len(qs))
        lp = res.logits[:, -1].float().log_softmax(-1)        # left-padded: the last position answers
        for q, m in zip(qs, (lp[:, yes] - lp[:, no]).tolist()):
            out[q["family"]][0].append(m)
            out[q["family"]][1].append(q["answer"] == "yes")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--split", default="test", choices=("train", "test", "report"))
    ap.add_argument("--scans", type=int, default=24)
    ap.add_argument("--downsample", type=float, default=1.0, help="coarse-grid stream (curriculum stages)")
    ap.add_argument("--budget", default="auto")
    args = ap.parse_args(argv)
    predictor = Predictor(args.model, device="cpu")
    gen = DemoGenerator(args.split, seed=0, downsample=args.downsample)
    for fam, (m, y) in margins(predictor, gen, args.scans, args.budget).items():
        pos = sum(y)
        if not pos or pos == len(y):
            print(f"{fam}: {len(y)} questions, one answer only — AUROC undefined")
            continue
        mean = lambda v: sum(v) / len(v)  # noqa: E731
        print(f"{fam}: {len(y)} questions ({pos} yes); AUROC {auroc(m, y):.3f}; mean margin "
              f"yes {mean([a for a, b in zip(m, y) if b]):+.2f}, no {mean([a for a, b in zip(m, y) if not b]):+.2f}")


if __name__ == "__main__":
    main()
