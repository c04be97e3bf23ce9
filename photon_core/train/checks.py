"""Quick held-out checks a training run makes on its own device (the evaluator measures the model after).

* `detection_probe` — does the vision tower mark the findings? The training-only head's finding score
  per token on held-out scans and their clean twins: per-token AUROC, within organ tissue, and at
  scan level (a scan's most finding-like token against "the scan has a finding"; what an existence
  answer needs), and how often a scan out-scores its own twin.
* `answer_check` — do the yes/no answers come from the image? Existence and anomaly questions of
  held-out scans answered by the first token (yes or no, greedy) at the auto budget: balanced
  accuracy per family, keep rate, the asked organ's blocks kept; then the same questions with the
  volume replaced by uniform noise (balanced accuracy should fall to 0.5, and the coverage with it).
* `stream_parity` — does the GPU stream give the CPU generator's scans on this device? The same
  findings, questions, answers and finding maps, and frames within the devices' noise.
* `null_answers` — the app's suggested questions on an all-air and a uniform-noise volume, decoded:
  are the answers readable as answers of their questions (`inference.answers.readable`, what the app
  shows as an unreadable answer otherwise)?
"""
from __future__ import annotations

import torch

from photon_core.eval.metrics import auroc, balanced_accuracy
from photon_core.inference.answers import readable
from photon_core.inference.generate import generate
from photon_core.inference.prompt import Tokenizer, batch_prompts
from photon_core.io import samples
from photon_core.io.preprocess import block_fractions, patchify
from photon_core.model.photon import PhotonModel
from photon_core.organs import BLOCK_FRACTION, block_cover
from photon_core.train.aux_head import AuxHead
from photon_core.train.synthetic.generator import DemoGenerator, null_frames
from photon_core.train.synthetic.gpu import GpuStream, pixels
from photon_core.train.synthetic.questions import FINDING_FAMILIES


def stream_parity(bodies: dict | None, device, n: int = 3, split: str = "val", seed: int = 0,
                  downsample: float = 1.0) -> dict:
    """``n`` scans with findings of the CPU generator (the reference) and of the GPU stream, same seed,
    the pool's undeformed bodies: findings (meta), questions and answers, and finding maps compared
    exactly; frames by their largest difference — acquisition noise (σ ≤ 0.01) and lesion texture
    (σ = 0.004) are drawn by each device's own generator, so up to ≈ 0.1 on a GPU and 0 on the CPU."""
    ref = DemoGenerator(split, seed=seed, pool=0, backgrounds=bodies, downsample=downsample)
    # all of the reference first: both seed torch's generator when they are made
    want = [(ref.sample(with_findings=1.0), ref.last_truth) for _ in range(n)]
    stream = GpuStream(split, seed=seed, pool=0, device=device, bodies=bodies, downsample=downsample)
    got = [(stream.scan(with_findings=1.0), stream.gen.last_truth) for _ in range(n)]
    same = all(s.meta == meta and s.qa == qa for ((_, qa, meta, _), _), (s, _) in zip(want, got))
    maps = all((a is None) == (b is None) and (a is None or torch.equal(a, b.cpu()))
               for (_, a), (_, b) in zip(want, got))
    diff = max(float((s.frames.cpu() - w[0]).abs().max()) for (w, _), (s, _) in zip(want, got))
    return dict(scans=n, device=str(device), findings_questions_answers_equal=same, finding_maps_equal=maps,
                frames_max_abs_diff=diff)


def _safe_auroc(scores, positive) -> float | None:
    return auroc(scores, positive) if 0 < sum(positive) < len(positive) else None


@torch.no_grad()
def detection_probe(model: PhotonModel, aux: AuxHead, stream: GpuStream, pairs: int) -> dict:
    """The tower's finding read-out (``aux``'s finding logit) on ``pairs`` held-out scans with findings
    and their clean twins."""
    was = model.training
    model.eval()
    tok_scores, tok_pos, tissue_scores, tissue_pos, scan_scores, scan_pos, wins = [], [], [], [], [], [], []
    for _ in range(pairs):
        s = stream.scan(with_findings=1.0)
        scans = [s, stream.twin(s)]
        logits = aux.finding_logits(model.encode_volume(*pixels(scans)), 2).float()      # (2, V)
        for x, sc in zip(logits, scans):
            pos = sc.targets["lesion"] > 0
            tissue = sc.targets["organ"].sum(-1) >= BLOCK_FRACTION
            tok_scores += x.tolist()
            tok_pos += pos.tolist()
            tissue_scores += x[tissue].tolist()
            tissue_pos += pos[tissue].tolist()
            scan_scores.append(float(x.max()))
            scan_pos.append(bool(pos.any()))
        if scan_pos[-2]:
            wins.append(scan_scores[-2] > scan_scores[-1])
    model.train(was)
    return dict(pairs=pairs, finding_tokens=int(sum(tok_pos)), token_auroc=_safe_auroc(tok_scores, tok_pos),
                tissue_auroc=_safe_auroc(tissue_scores, tissue_pos),
                scan_auroc=_safe_auroc(scan_scores, scan_pos),
                pair_win_rate=sum(wins) / len(wins) if wins else None)


def _first_tokens(model: PhotonModel, tok: Tokenizer, frames: torch.Tensor, questions: list[str]):
    """Greedy first answer token of each question on one volume, and the prefill's ITS state."""
    pv, grid = pixels_of(frames)
    m2 = model.config.vision.spatial_merge_size ** 2
    n_visual = int(grid.prod()) // m2
    ids, mask, _ = batch_prompts([tok.prompt(q, n_visual)[0] for q in questions], model.config.pad_token_id)
    dev = frames.device
    out = model(ids.to(dev), mask.to(dev), pixel_values=pv, grid_thw=grid, row_scan=[0] * len(questions))
    return out.logits[:, -1].float(), out.its


def pixels_of(frames: torch.Tensor):
    """One (D, H, W) volume as patch rows and its grid, on the volume's device."""
    rows, grid = patchify(frames[:, None])
    return rows, grid.to(frames.device)


@torch.no_grad()
def answer_check(model: PhotonModel, tok: Tokenizer, stream: GpuStream, n_scans: int) -> dict:
    """First-token yes/no answers to the existence and anomaly questions of ``n_scans`` held-out scans,
    on each scan and on uniform noise in its place (auto budget)."""
    was = model.training
    model.eval()
    yes, no = tok.encode("yes")[0], tok.encode("no")[0]
    rows = {"scan": [], "noise": []}
    keep, cover = {"scan": [], "noise": []}, {"scan": [], "noise": []}
    other = 0
    for _ in range(n_scans):
        s = stream.scan()
        qs = [q for q in s.qa if q["family"] in FINDING_FAMILIES and q["answer_type"] == "closed"]
        if not qs:
            continue
        blocks = {o: block_cover(block_fractions(m, stream.grid), small=False).to(stream.device)
                  for o, m in s.organs.items()}
        for kind, frames in (("scan", s.frames), ("noise", torch.rand_like(s.frames))):
            logits, its = _first_tokens(model, tok, frames, [q["question"] for q in qs])
            top = logits.argmax(-1)
            other += int(((top != yes) & (top != no)).sum()) if kind == "scan" else 0
            said = ["yes" if a > b else "no" for a, b in zip(logits[:, yes].tolist(), logits[:, no].tolist())]
            for q, a, k in zip(qs, said, its.keep):
                rows[kind].append(dict(family=q["family"], answer_type="closed", answer=q["answer"],
                                       scores={"accuracy": float(a == q["answer"])}))
                keep[kind].append(float(k.float().mean()))
                if q["organ"] in blocks and bool(blocks[q["organ"]].any()):
                    cover[kind].append(float(k[blocks[q["organ"]]].float().mean()))
    model.train(was)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    out = {"scans": n_scans, "questions": len(rows["scan"]), "first_token_not_yes_no": other}
    for kind in ("scan", "noise"):
        out[kind] = dict(balanced=balanced_accuracy(rows[kind]), keep=mean(keep[kind]),
                         asked_organ_coverage=mean(cover[kind]))
    return out


@torch.no_grad()
def null_answers(model: PhotonModel, tok: Tokenizer, shape: tuple, device, max_new_tokens: int = 8) -> dict:
    """The bundled cases' suggested questions on an all-air and a uniform-noise volume, decoded greedily."""
    was = model.training
    model.eval()
    questions = sorted({q for c in samples.cases() for q in c["questions"]})
    out = {}
    for kind in ("air", "noise"):
        frames = null_frames(kind, shape, device)
        pv, grid = pixels_of(frames)
        feats = model.encode_volume(pv, grid)
        n_visual = feats.shape[0]
        eos = model.config.eos_token_id
        prompts = [tok.prompt(q, n_visual)[0] for q in questions]
        ids, mask, _ = batch_prompts(prompts, model.config.pad_token_id)
        # the captured eager step on CUDA: a compile's warm-up would eat the call's reserved seconds
        mode = "graph" if torch.device(device).type == "cuda" else "eager"
        toks = generate(model, ids.to(device), mask.to(device), features=feats.repeat(len(prompts), 1),
                        grid_thw=grid, max_new_tokens=max_new_tokens, eos_token_id=eos, mode=mode).tokens
        texts = [tok.decode([t for t in row if t != eos]) for row in toks.tolist()]
        out[kind] = {q: t for q, t in zip(questions, texts)}
    model.train(was)
    answers = [(q, t) for d in out.values() for q, t in d.items()]
    return dict(answers=out, malformed=sum(not readable(q, t) for q, t in answers), asked=len(answers))
