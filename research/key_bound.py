"""How far apart could ANY question put the kept sets of two organs, given these keys? Measures and prints.

ITS's saliency of a visual token v for a question is u_v = Σ_t w_t q_t · k_v (t over the question's
tokens): for a given question, a linear functional of the token's key at the ITS layer. The visual
tokens come before the question in the prompt, so under causal attention their keys do not depend on
it; only the query side does. So the kept sets a question *could* reach are bounded by what a linear
functional of the keys can select. For test-split scans of the demo generator and "Is there a lesion
in the {organ}?" for every labelled organ, against each organ's keep target (its blocks and the blocks
nearest them, ``--frac`` of the tokens; `photon_core.train.keep_target`), top-k at the target's size:

* ``model``: the model's own ρ for the question;
* ``best, this scan``: a ridge fit of the target on this scan's keys (an upper bound);
* ``best, one per organ``: a ridge fit per organ on the other scans of the same body (a fixed query
  per organ, scored on a scan it was not fit on) — what one question vector per organ can reach.

Printed per body (abdominal, chest): the mean Jaccard of two organs' sets on the same scan (beside
the targets' own), and the share of the asked organ's blocks (≥ 25% organ) in its set. The same on
the visual tokens the LLM reads (before layer 0) for comparison. If ``model`` is far above ``best,
one per organ``, the keys allow what the query side does not reach; if both are high, the keys
(the vision tower) are the limit.

    python research/key_bound.py                        # shipped model, 16 test scans
    python research/key_bound.py --model runs/x/model --scans 8
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from photon_core.inference.audit import pairwise_jaccard
from photon_core.inference.predictor import DEMO_MODEL, Predictor
from photon_core.organs import BLOCK_FRACTION, ORGANS
from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.targets import keep_target, token_targets

MODES = ("model", "best, this scan", "best, one per organ")


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 1e-2):
    """Ridge regression of ±1 labels on standardised features (with a bias); returns a scorer."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = np.c_[(x - mu) / sd, np.ones(len(x))]
    w = np.linalg.solve(a.T @ a + lam * len(x) * np.eye(a.shape[1]), a.T @ (2.0 * y - 1.0))
    return lambda f: np.c_[(f - mu) / sd, np.ones(len(f))] @ w


def top(score: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(len(score), bool)
    keep[np.argsort(-score, kind="stable")[:k]] = True
    return keep


def collect(pred: Predictor, n: int, frac: float, seed: int = 0, pool: int = 6) -> list[dict]:
    """Per scan: body, keys at the ITS layer (V, Hkv·d), visual tokens (V, D), and per organ the
    model's ρ, the keep target and the organ's blocks."""
    model = pred.model
    caught = {}
    its = model._its

    def catch(q, k, vision, question, *args, **kw):
        vi = vision[0].nonzero().flatten()
        caught["k"] = k[0][:, vi].detach().float().transpose(0, 1).flatten(1)
        return its(q, k, vision, question, *args, **kw)

    model._its = catch
    try:
        gen = DemoGenerator("test", seed=seed, pool=pool)
        scans = []
        for _ in range(n):
            frames, _, meta, organs = gen.sample()
            names = [o for o, m in organs.items() if bool(m.any())]
            tg = token_targets(organs, None)
            pred.set_volume(frames)
            rho = {o: pred.ask(f"Is there a lesion in the {o}?", max_new_tokens=1).rho.ravel() for o in names}
            keys = caught["k"].numpy()             # the same for every question (causal attention)
            scans.append(dict(
                body="chest" if meta["background"].startswith("chest") else "abdomen", keys=keys,
                tokens=pred.features.float().numpy(), rho=rho,
                target={o: keep_target(f"Is there a lesion in the {o}?", tg, frac).numpy().astype(bool)
                        for o in names},
                blocks={o: (tg["organ"][:, list(ORGANS).index(o)] >= BLOCK_FRACTION).numpy() for o in names}))
        return scans
    finally:
        del model._its


def bound(scans: list[dict], feature: str, mode: str) -> dict:
    """Mean pairwise Jaccard (and the targets' own), asked-organ coverage, for one feature and mode."""
    jac, own, cover = [], [], []
    for i, s in enumerate(scans):
        sets = {}
        for o, y in s["target"].items():
            if not y.any():
                continue
            if mode == "model":
                score = s["rho"][o]
            elif mode == "best, this scan":
                score = ridge(s[feature], y.astype(float))(s[feature])
            else:
                others = [t for j, t in enumerate(scans) if j != i and t["target"].get(o, np.zeros(1)).any()]
                if not others:
                    continue
                fit = ridge(np.concatenate([t[feature] for t in others]),
                            np.concatenate([t["target"][o] for t in others]).astype(float))
                score = fit(s[feature])
            sets[o] = top(score, int(y.sum()))
            if s["blocks"][o].any():
                cover.append(float(sets[o][s["blocks"][o]].mean()))
        jac += pairwise_jaccard(list(sets.values()))
        own += pairwise_jaccard([s["target"][o] for o in sets])
    mean = lambda xs: float(np.mean(xs)) if xs else float("nan")  # noqa: E731
    return dict(jaccard=mean(jac), target_jaccard=mean(own), pairs=len(jac), cover=mean(cover))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--scans", type=int, default=16)
    ap.add_argument("--frac", type=float, default=0.15, help="keep target's share of the tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=6,
                    help="deformed bodies per case in the generator's pool (default %(default)s)")
    args = ap.parse_args(argv)
    folder = args.model or DEMO_MODEL
    with torch.inference_mode():
        scans = collect(Predictor(folder, device="cpu"), args.scans, args.frac, args.seed, args.pool)
    print(f"model: {folder}; {args.scans} test scans; keep target {args.frac:.0%} of the tokens; "
          "top-k at its size")
    out: dict = {}
    for body in ("abdomen", "chest"):
        ss = [s for s in scans if s["body"] == body]
        if not ss:
            continue
        for feature, label in (("keys", "keys at the ITS layer"), ("tokens", "visual tokens (LLM input)")):
            for mode in MODES if feature == "keys" else MODES[1:]:
                if mode == "best, one per organ" and len(ss) < 2:
                    print(f"{body:8s} {label:26s} {mode:20s} needs two scans of this body (has one)")
                    continue
                r = out.setdefault(body, {}).setdefault(feature, {})[mode] = bound(ss, feature, mode)
                print(f"{body:8s} {label:26s} {mode:20s} Jaccard {r['jaccard']:.3f} (targets' own "
                      f"{r['target_jaccard']:.3f}, {r['pairs']} pairs), "
                      f"asked organ's blocks {r['cover']:.3f}")
    return out


if __name__ == "__main__":
    main()
