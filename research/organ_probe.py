"""Do the visual tokens carry organ extent? A diagnostic that measures and prints.

"Is the spleen enlarged?" and "What is the volume of the liver?" need how much of each token block an
organ fills, summed over the scan. A least-squares probe (visual tokens → the share of each block
that belongs to the liver, spleen and either kidney) is fit on scans of the demo generator's train
split and scored on the test split (scans with an enlarged organ among them):

* token R² of the probe's organ shares;
* the correlation, over test scans, of the probe's summed organ volume with the true volume;
* for "Is the {organ} enlarged?", the AUROC (within organ: each value against the median of the
  same organ's normal scans, pooled) of the true volume — the ceiling —, of the probe's volume, of
  the number of tokens ITS keeps for the question, and of the model's margin log P(yes) − log P(no);
* the asked organ's blocks (≥ 25% organ) that ITS keeps for "Is there a lesion in the {organ}?", on
  the scan and on uniform noise of the same shape: as high on noise means the selection is a place
  learned for the organ's name rather than the organ seen in the scan.

If the probe's volume is at chance, no reading by the LLM can answer the question from the image.

    python research/organ_probe.py --scans 24                      # shipped model
    python research/organ_probe.py --model runs/x/model
"""
from __future__ import annotations

import argparse
import statistics

import torch

from photon_core.eval.metrics import auroc
from photon_core.inference.predictor import DEMO_MODEL, Predictor
from photon_core.io.preprocess import TOKEN_VOXELS, patchify
from photon_core.model.checkpoint import load_model
from photon_core.organs import BLOCK_FRACTION, ORGANS
from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.synthetic.questions import ENLARGE_ORGANS, ENLARGED, EXIST
from photon_core.train.targets import token_targets

COLUMNS = [list(ORGANS).index(o) for o in ENLARGE_ORGANS]


def _bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)


def fit_probe(x: torch.Tensor, y: torch.Tensor):
    """Least squares (N, D) tokens → (N, K) targets, with a bias; returns the probe as a function."""
    w = torch.linalg.lstsq(_bias(x.double()), y.double(), driver="gelsd").solution
    return lambda t: (_bias(t.double()) @ w).float()


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def within_organ_auroc(rows: list[dict], key: str) -> float:
    """AUROC of ``key`` for "enlarged", each value taken against the median of its organ's normal scans
    (as a ratio for the counts and volumes, as a difference for the margin), pooled over organs."""
    s = []
    for r in rows:
        ref = statistics.median([q[key] for q in rows if q["organ"] == r["organ"] and not q["enlarged"]]
                                or [0.0])
        s.append(r[key] - ref if key == "margin" else r[key] / max(ref, 1e-6))
    return auroc(s, [r["enlarged"] for r in rows])


@torch.no_grad()
def scans(model, split: str, n: int, enlargement: float, seed: int = 7, pool: int = 3):
    """Yields ``n`` scans (bodies with abdominal organs) as (frames, visual tokens (V, D), organ shares
    (V, 4), {organ: voxels}, enlarged organs), one at a time."""
    gen = DemoGenerator(split, seed=seed, pool=pool, enlargement=enlargement)
    done = 0
    while done < n:
        frames, _, meta, organs = gen.sample()
        if not any(o in organs for o in ENLARGE_ORGANS):       # a chest body (lungs and aorta only)
            continue
        done += 1
        x = model.encode_volume(*patchify(frames[:, None])).float()
        share = token_targets(organs, None)["organ"][:, COLUMNS]
        grown = {f["organ"] for f in meta["findings"] if f["kind"] == "enlargement"}
        yield frames, x, share, {o: float(organs[o].sum()) for o in ENLARGE_ORGANS if o in organs}, grown


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--scans", type=int, default=24, help="scans to fit the probe on, and as many to score")
    ap.add_argument("--enlargement", type=float, default=0.6,
                    help="share of test scans with an enlarged organ")
    ap.add_argument("--pool", type=int, default=3,
                    help="deformed bodies per case in the generator's pool (default %(default)s)")
    args = ap.parse_args(argv)
    path = args.model or DEMO_MODEL
    model = load_model(path, "cpu", torch.float32).eval()
    fit = [(x, share) for _, x, share, _, _ in scans(model, "train", args.scans, 1.0, pool=args.pool)]
    probe = fit_probe(torch.cat([x for x, _ in fit]), torch.cat([s for _, s in fit]))
    block = torch.tensor(TOKEN_VOXELS).prod().item()        # voxels a token block holds
    pred = Predictor(path, device="cpu")
    yes, no = pred.tokenizer.encode("yes")[0], pred.tokenizer.encode("no")[0]
    rows, cover, preds, shares = [], {"scan": [], "noise": []}, [], []
    test = scans(model, "test", args.scans, args.enlargement, pool=args.pool)
    for frames, x, share, volumes, grown in test:
        preds.append(probe(x))
        shares.append(share)
        est = preds[-1].clamp(min=0).sum(0) * block
        organs = list(volumes)
        pred.set_volume(frames)
        qs = [ENLARGED[0].format(o=o) for o in organs]            # one batched prefill each
        lp = pred.answer_logprobs(qs, "auto")
        for o, a, m in zip(organs, pred.ask_many(qs, "auto", max_new_tokens=1),
                           (lp[:, yes] - lp[:, no]).tolist()):
            rows.append(dict(organ=o, enlarged=o in grown, volume=volumes[o],
                             probe_volume=float(est[ENLARGE_ORGANS.index(o)]), kept=float(a.kept), margin=m))
        # The asked organ's blocks kept for a lesion question, on the scan and on noise of its shape:
        # as high on noise = the selection is a place learned for the organ's name, not the organ seen.
        for key, volume in (("scan", frames), ("noise", torch.rand_like(frames))):
            pred.set_volume(volume)
            for o, a in zip(organs, pred.ask_many([EXIST[0].format(o=o) for o in organs], "auto",
                                                  max_new_tokens=1)):
                organ_blocks = (share[:, ENLARGE_ORGANS.index(o)] >= BLOCK_FRACTION).numpy()
                if organ_blocks.any():
                    cover[key].append(float(a.keep_grid.ravel()[organ_blocks].mean()))
    preds, shares = torch.cat(preds), torch.cat(shares)
    out = {"r2": {}, "correlation": {}, "auroc": {}}
    for j, o in enumerate(ENLARGE_ORGANS):
        r = [q for q in rows if q["organ"] == o]
        out["r2"][o] = r2(preds[:, j], shares[:, j])
        out["correlation"][o] = float(torch.corrcoef(torch.tensor([[q["volume"] for q in r],
                                                                   [q["probe_volume"] for q in r]]))[0, 1]) \
            if len(r) > 2 else float("nan")
        print(f"{o}: token R² {out['r2'][o]:.3f}; probe volume vs true volume, correlation "
              f"{out['correlation'][o]:.3f} over {len(r)} scans")
    out["coverage"] = {k: sum(v) / len(v) for k, v in cover.items() if v}
    if out["coverage"]:
        print(f"'Is there a lesion in the organ?': asked organ's blocks kept {out['coverage']['scan']:.3f} "
              f"on the scan, {out['coverage']['noise']:.3f} on uniform noise "
              f"({len(cover['scan'])} questions)")
    n_pos = sum(r["enlarged"] for r in rows)
    if not n_pos or n_pos == len(rows):
        print(f"{len(rows)} enlargement questions, one answer only — AUROC undefined")
        return out
    out["auroc"] = {k: within_organ_auroc(rows, k) for k in ("volume", "probe_volume", "kept", "margin")}
    print(f"'Is the organ enlarged?': {len(rows)} questions ({n_pos} enlarged); within-organ AUROC of "
          + ", ".join(f"{k} {v:.3f}" for k, v in out["auroc"].items()))
    return out

if __name__ == "__main__":
    main()
