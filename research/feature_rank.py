"""How many directions do the visual tokens use, and does the question move ITS's ranking? Measures \
and prints.

For test-split scans of the demo generator, per background (abdominal, chest):

* the visual tokens (the merger's output, what the LLM reads) and the tower's hidden states (the
  merger's input): mean norm, the share of the norm that is the mean vector all tokens share, and the
  share of the variance (over tokens, around that mean) in the top 1 / 3 / 10 principal directions.
  A share near 1 in one direction means the tokens differ from each other along one line: the LLM
  gets a scalar per token (roughly its density), whatever the tower's width;
* ITS's saliency ρ for "Is there a lesion in the {organ}?" over every labelled organ of the scan:
  the mean correlation of ρ between two questions, and the question-dependent share of ρ's variance
  (variance across questions, per token, over variance across tokens, per question). A correlation
  of 1 and a share of 0 mean the same tokens rank first whatever organ is asked: no budget can make
  the kept sets of two organ prompts differ;
* the correlation of ρ on the scan with ρ on uniform noise of its shape, for the same question;
* what the auto budget keeps for those questions: tokens kept, the asked organ's blocks kept (block =
  ≥ 25% organ voxels) on the scan and on the noise, and the Jaccard of the kept sets of two organ
  questions on the same scan (the model card's "two organ prompts" figure, split by body);
* the question's words where ITS reads them (the ITS layer's input): the question tokens' mean hidden
  norm against their embeddings', and the mean pairwise cosine of the organ questions' mean question
  states beside the same cosine of their mean embeddings (the questions differ only in the organ's
  words, so the embeddings' cosine is the reference) — a state cosine near 1 far above it would mean
  the words are swamped before ITS reads them (on the demo model it is not: the two are alike).

    python research/feature_rank.py                     # shipped model, 6 test scans
    python research/feature_rank.py --model runs/x/model --scans 12
"""
from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from photon_core.inference.audit import pairwise_jaccard
from photon_core.inference.predictor import DEMO_MODEL, Predictor
from photon_core.organs import BLOCK_FRACTION, ORGANS
from photon_core.train.synthetic.generator import DemoGenerator
from photon_core.train.targets import token_targets


def spectrum(x: torch.Tensor) -> dict:
    """Norm, mean-vector share and principal-direction variance shares of a (N, D) token matrix."""
    mu = x.mean(0)
    sv2 = torch.linalg.svdvals(x - mu).pow(2)
    share = lambda k: float(sv2[:k].sum() / sv2.sum().clamp_min(1e-12))  # noqa: E731
    return dict(norm=float(x.norm(dim=-1).mean()), mean_share=float(mu.norm() / x.norm(dim=-1).mean()),
                top1=share(1), top3=share(3), top10=share(10))


def question_dependence(rho: np.ndarray) -> tuple[float, float]:
    """(questions, tokens) ρ → mean pairwise correlation between questions, question-dependent variance
    share."""
    c = np.corrcoef(rho)
    off = c[~np.eye(len(rho), dtype=bool)]
    return float(np.nanmean(off)), float(rho.var(0).mean() / max(rho.var(1).mean(), 1e-12))


def pairwise_cosine(x: torch.Tensor) -> float:
    """Mean cosine over the distinct pairs of the rows of (Q, D) ``x``."""
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    c = x @ x.T
    return float(c[~torch.eye(len(x), dtype=torch.bool)].mean())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded demo model)")
    ap.add_argument("--scans", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pool", type=int, default=6,
                    help="deformed bodies per case in the generator's pool (default %(default)s)")
    args = ap.parse_args(argv)
    folder = args.model or DEMO_MODEL
    pred = Predictor(folder, device="cpu")
    hidden = {}          # the merger's input, caught as set_volume encodes; its output is pred.features
    pred.model.visual.merger.register_forward_hook(lambda mod, inp, out: hidden.__setitem__("x", inp[0]))
    model = pred.model
    caught: list = []   # per question asked: embedding norm, hidden norm, mean state, mean embedding
                        # (ITS layer input)

    masks = model.masks

    def catch_prompt(ids, mask):          # the prefill reads the prompt's masks once, before its layers
        hidden["ids"], hidden["mask"] = ids, mask
        return masks(ids, mask)

    def catch_its_input(mod, args):
        ids, mask = hidden.pop("ids", None), hidden.pop("mask", None)
        if ids is None or args[0].shape[1] != ids.shape[1]:          # a decode step, not a prefill
            return
        _, question = masks(ids, mask)
        emb = model.model.embed_tokens(ids)
        for b in range(ids.shape[0]):
            qi = question[b]
            caught.append((float(emb[b, qi].norm(dim=-1).mean()), float(args[0][b, qi].norm(dim=-1).mean()),
                           args[0][b, qi].float().mean(0), emb[b, qi].float().mean(0)))

    model.masks = catch_prompt
    model.model.layers[model.its_layer].register_forward_pre_hook(catch_its_input)
    gen = DemoGenerator("test", seed=args.seed, pool=args.pool)
    rows: dict[str, list] = {}
    for _ in range(args.scans):
        frames, _, meta, organs = gen.sample()
        body = "chest" if meta["background"].startswith("chest") else "abdomen"
        names = [o for o, m in organs.items() if bool(m.any())]
        questions = [f"Is there a lesion in the {o}?" for o in names]
        blocks = token_targets(organs, None)["organ"] >= BLOCK_FRACTION      # (V, organs)
        cols = [list(ORGANS).index(o) for o in names]
        pred.set_volume(frames)
        tokens, tower = pred.features.float(), hidden["x"].float()
        caught.clear()
        scan = [pred.ask(q, max_new_tokens=1) for q in questions]
        states = caught[:]
        pred.set_volume(torch.rand_like(frames))
        noise = [pred.ask(q, max_new_tokens=1) for q in questions]
        rho, rho_noise = (np.stack([a.rho.ravel() for a in ans]) for ans in (scan, noise))
        corr, share = question_dependence(rho)
        cover = lambda ans: [float(a.keep_grid.ravel()[blocks[:, c].numpy()].mean())  # noqa: E731
                             for a, c in zip(ans, cols) if bool(blocks[:, c].any())]
        rows.setdefault(body, []).append(dict(
            tokens=spectrum(tokens), hidden=spectrum(tower), corr=corr, share=share,
            noise=float(np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(rho, rho_noise)])),
            kept=[a.kept for a in scan], jaccard=pairwise_jaccard([a.keep_grid for a in scan]),
            cover=cover(scan), cover_noise=cover(noise), embed_norm=[s[0] for s in states],
            state_norm=[s[1] for s in states], state_cos=pairwise_cosine(torch.stack([s[2] for s in states])),
            embed_cos=pairwise_cosine(torch.stack([s[3] for s in states]))))
    mean = lambda xs: statistics.mean(xs) if xs else float("nan")  # noqa: E731
    flat = lambda rs, k: [v for r in rs for v in r[k]]  # noqa: E731
    print(f"model: {folder}")
    summary = {}
    for body, rs in rows.items():
        summary[body] = dict(corr=mean([r["corr"] for r in rs]), share=mean([r["share"] for r in rs]),
                             jaccard=mean(flat(rs, "jaccard")), pairs=len(flat(rs, "jaccard")),
                             cover=mean(flat(rs, "cover")), cover_noise=mean(flat(rs, "cover_noise")),
                             kept=mean(flat(rs, "kept")), state_cos=mean([r["state_cos"] for r in rs]),
                             embed_cos=mean([r["embed_cos"] for r in rs]),
                             state_norm=mean(flat(rs, "state_norm")), embed_norm=mean(flat(rs, "embed_norm")),
                             **{f"tokens_{k}": mean([r["tokens"][k] for r in rs]) for k in rs[0]["tokens"]})
        print(f"\n{body}: {len(rs)} scans")
        for part in ("tokens", "hidden"):
            s = {k: mean([r[part][k] for r in rs]) for k in rs[0][part]}
            label = "visual tokens (merger output)" if part == "tokens" else "tower hidden (merger input)"
            print(f"  {label:31s} norm {s['norm']:7.2f}  mean-vector share {s['mean_share']:.3f}  "
                  "variance in top 1 / 3 / 10 directions "
                  f"{s['top1']:.3f} / {s['top3']:.3f} / {s['top10']:.3f}")
        print(f"  ITS rho between two organ questions: correlation {mean([r['corr'] for r in rs]):.3f}, "
              f"question-dependent variance share {mean([r['share'] for r in rs]):.3f}")
        print("  ITS rho, scan vs uniform noise (same question): "
              f"correlation {mean([r['noise'] for r in rs]):.3f}")
        m = summary[body]
        print(f"  question states at the ITS layer: norm {m['state_norm']:.2f} "
              f"(embeddings {m['embed_norm']:.2f}), "
              f"cosine between organ questions {m['state_cos']:.3f} (their embeddings' {m['embed_cos']:.3f})")
        print(f"  auto budget: {m['kept']:.0f} tokens kept; asked organ's blocks kept {m['cover']:.3f} "
              f"on the scan, {m['cover_noise']:.3f} on noise; "
              f"Jaccard of two organ prompts {m['jaccard']:.3f} ({m['pairs']} pairs)")
    return summary


if __name__ == "__main__":
    main()
