"""Temporal pairs: a prior and a current scan in one prompt, from the generator to the app."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLES

from photon_core.inference.predictor import Predictor
from photon_core.model.budget import Budget
from photon_core.model.decoder import rope_index


def _frames(seed, bright=0.6):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(140, 280, 280, generator=g) * 0.2
    x[40:80, 100:180, 60:140] += bright
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def pred(tiny_model_dir):
    p = Predictor(tiny_model_dir, device="cpu")
    p.set_volume(_frames(0), prior=_frames(1, 0.3))
    return p


def test_two_volume_prompt_masks_and_positions(pred):
    m, tok = pred.model, pred.tokenizer
    q = "Has the liver lesion grown since the prior scan?"
    ids, _ = tok.prompt(q, 1000, prior_visual=1000)
    ids_t = torch.tensor([ids])
    vision, question = m.masks(ids_t, torch.ones_like(ids_t))
    assert int(vision.sum()) == 2000
    qpos = question[0].nonzero().flatten().tolist()
    assert [ids[i] for i in qpos] == tok.encode(q)          # the question only: not the span between volumes
    grid = torch.cat([pred.prior[1], pred.grid_thw])
    pos, _ = rope_index(ids_t, grid, None, m.config)
    vis = vision[0].nonzero().flatten()
    first, second = pos[:, 0, vis[:1000]], pos[:, 0, vis[1000:]]
    after_first = int(vis[999]) + 1                          # <|vision_end|> of the prior
    assert int(pos[0, 0, after_first]) == int(first.max()) + 1
    assert torch.equal(second - second[:, :1], first - first[:, :1])   # same layout, later offset
    assert int(second.min()) > int(first.max())


def test_answers_with_a_prior(pred):
    a = pred.ask("Has the liver lesion grown since the prior scan?", budget="top_k:300", max_new_tokens=3)
    assert (a.total, a.prior_total, a.kept) == (2000, 1000, 300)
    assert a.prior_kept == int(a.prior_keep_grid.sum()) and a.kept == a.prior_kept + int(a.keep_grid.sum())
    assert a.to_dict()["prior_kept"] == a.prior_kept
    many = pred.ask_many(["Has the liver lesion grown since the prior scan?",
                          "Is there a lesion in the liver?"],
                         ["auto", "ratio:0.1"], max_new_tokens=3)
    one = pred.ask("Is there a lesion in the liver?", "ratio:0.1", max_new_tokens=3)
    assert many[1].text == one.text and many[1].kept_indices == one.kept_indices and many[1].kept == 200


def test_the_prior_reaches_the_model(tiny_model_dir):
    p = Predictor(tiny_model_dir, device="cpu")
    m, tok = p.model, p.tokenizer
    cur, grid, _ = p.encode(_frames(0))
    logits = []
    for seed in (1, 2):
        prior, pgrid, _ = p.encode(_frames(seed, 0.1 * seed))
        ids = torch.tensor([tok.prompt("Has the liver lesion grown?", 1000, prior_visual=1000)[0]])
        with torch.no_grad():
            logits.append(m(ids, features=torch.cat([prior, cur]), grid_thw=torch.cat([pgrid, grid]),
                            budget="full").logits[0, -1])
    assert not torch.allclose(logits[0], logits[1], atol=1e-4)
    p.set_volume(_frames(0), prior=_frames(1))
    p.set_volume(_frames(0))                                   # a new volume without a prior clears it
    assert p.prior is None and p.ask("Is it?", max_new_tokens=1).total == 1000


def test_generator_pairs_have_exact_change_truth():
    from photon_core.train.synthetic.generator import DemoGenerator
    from photon_core.train.synthetic.questions import CHANGE, GROWN, RESOLVED

    def stream(n=16):      # the generator seeds torch's global stream: one generator at a time
        g = DemoGenerator("test", seed=3, pool=1, downsample=2.5)
        return [(*g.pair(), g.last_truths) for _ in range(n)]

    first, again = stream(), stream()
    seen, answers = set(), set()
    for (prior, cur, qa, meta, _, truths), (prior2, cur2, qa2, *_) in zip(first, again):
        assert torch.equal(prior, prior2) and torch.equal(cur, cur2) and qa == qa2      # deterministic
        for c in meta["changes"]:
            seen.add(c["change"])
            at = tuple(int(round(v)) for v in c["center_model_voxel"])
            for t, mm in zip(truths, (c["prior_mm"], c["current_mm"])):
                assert abs((float(t[at]) if t is not None else 0.0) - mm) <= 0.5 or len(meta["changes"]) > 1
            if c["change"] == "larger":
                assert c["current_mm"] > c["prior_mm"]
            if c["change"] in ("smaller", "resolved"):
                assert c["current_mm"] < c["prior_mm"]
            if c["change"] == "new":
                assert c["prior_mm"] == 0 < c["current_mm"]
        single = {c["organ"]: c for c in meta["changes"]}
        for q in qa:
            if q["family"] != "temporal" or sum(c["organ"] == q["organ"] for c in meta["changes"]) != 1:
                continue
            c = single[q["organ"]]
            if q["question"] in [t.format(o=q["organ"]) for t in CHANGE]:
                assert q["answer"] == c["change"]
            if q["question"] in [t.format(o=q["organ"]) for t in GROWN]:
                assert q["answer"] == ("yes" if c["change"] == "larger" else "no")
            if q["question"] in [t.format(o=q["organ"]) for t in RESOLVED]:
                answers.add(q["answer"])
                assert q["answer"] == ("yes" if c["change"] == "resolved" else "no")
    assert len(seen) >= 3 and answers == {"yes", "no"}        # "resolved?" is not a constant "yes"


def test_temporal_training_steps(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "photon_core.train", "--out", str(out), "--preset", "tiny",
                        "--steps", "2", "--downsample", "2.5", "--temporal", "1", "--scans-per-step", "1",
                        "--questions-per-scan", "2", "--pool", "0", "--warmup", "1", "--log-every", "1",
                        "--device", "cpu", "--guide", "0.1", "--aux", "0.5", "--phase2-start", "0",
                        "--phase3-start", "0.5", "--robust-prob", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["temporal"] for x in lines] == [True, True] and [x["phase"] for x in lines] == [2, 3]
    assert all(x["loss"] == x["loss"] and "guide" in x and "aux" in x for x in lines)


def test_evaluator_reads_prior_images(tiny_model_dir, tmp_path):
    from photon_core.eval.datasets import read_records
    from photon_core.eval.evaluate import evaluate_records

    for name, seed in (("now.npy", 0), ("before.npy", 1)):
        np.save(tmp_path / name, _frames(seed).numpy())
    recs = [dict(image="now.npy", prior_image="before.npy", space="model",
                 question="Has the liver lesion grown?", answer="no", family="temporal"),
            dict(image="now.npy", space="model", question="Is there a lesion in the liver?", answer="no"),
            dict(image="now.npy", prior_image="missing.npy", space="model", question="Has it grown?",
                 answer="yes")]
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    read = read_records(data)
    assert read[0]["prior_image"] == str(tmp_path / "before.npy") and "prior_image" not in read[1]
    rows = evaluate_records(Predictor(tiny_model_dir, device="cpu"), read, max_new_tokens=2)
    by_q = {r["question"]: r for r in rows}
    assert by_q["Has the liver lesion grown?"]["total"] == 2000
    assert by_q["Is there a lesion in the liver?"]["total"] == 1000
    assert "missing.npy" in by_q["Has it grown?"]["error"]                 # reported on its row, not fatal


def test_app_session_with_a_prior_scan(tiny_model_dir, tmp_path):
    from app.render import answer_card, status_html
    from app.service import Engine, Settings
    from photon_core.io.volume import VolumeError

    engine = Engine(Settings(model_dir=str(tiny_model_dir), device="cpu", max_new_tokens=3, cache_volumes=1))
    ct = str(SAMPLES / "abdomen_ct" / "ct.nii.gz")
    prior = str(SAMPLES / "chest_aorta_ct" / "ct.nii.gz")
    s = engine.load_upload([ct], None, prior_file=prior)
    a, audit = engine.answer(s, "Has the liver lesion grown since the prior scan?", Budget("top_k", 400))
    assert (a.total, a.prior_total, a.kept) == (2000, 1000, 400)
    assert "Prior scan" in status_html(s) and "prior scan" in answer_card(s, a, audit, {"name": "m"})
    files = engine.export(s, {}, tmp_path / "export")
    report = json.loads(next(p for p in files if p.name == "report.json").read_text())
    assert report["prior_scan"]["visual_tokens_kept"] == a.prior_kept
    other = engine.load_case("dicom_ct")                       # evicts both from the 1-volume cache
    assert engine.ask(other, "Is it?", Budget("auto")).total == 1000
    assert engine.ask(s, "Is it?", Budget("auto")).total == 2000   # re-encoded with its prior
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"nope")
    with pytest.raises(VolumeError, match="prior scan could not be read"):
        engine.load_upload([ct], None, prior_file=str(bad))
    engine.close()


def test_ask_cli_with_a_prior(tiny_model_dir):
    r = subprocess.run([sys.executable, "-m", "photon_core.inference.ask",
                        "--scan", str(SAMPLES / "abdomen_ct/ct.nii.gz"),
                        "--prior", str(SAMPLES / "chest_aorta_ct/ct.nii.gz"),
                        "--question", "Has the lesion grown?", "--budget", "25%",
                        "--model", str(tiny_model_dir), "--device", "cpu", "--max-new-tokens", "2", "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout.strip().splitlines()[-1])
    assert (d["total"], d["kept"], d["prior_total"]) == (2000, 500, 1000)


def test_counterfactual_training_steps(tmp_path):
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "photon_core.train", "--out", str(out), "--preset", "tiny",
                        "--steps", "2", "--downsample", "2.5", "--counterfactual", "1",
                        "--scans-per-step", "2", "--questions-per-scan", "2", "--pool", "0", "--warmup", "1",
                        "--log-every", "1", "--device", "cpu", "--guide", "0.1", "--aux", "0.5",
                        "--robust-prob", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["counterfactual"] for x in lines] == [True, True]
    assert all(x["loss"] == x["loss"] and "guide" in x and "aux" in x for x in lines)
