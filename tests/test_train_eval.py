"""Training and evaluation engines: a 2-process gloo DDP run and a sharded evaluation, tiny configs."""
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

from photon_core.eval.metrics import aggregate, bleu1, closed_correct, mra, rouge1

pytestmark = pytest.mark.slow


def _start_torchrun(args, tmp_path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PHOTON_DIST_TIMEOUT="120",
               TMPDIR=str(tmp_path))                      # torchrun's per-run log folders stay there
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0"] + args
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _torchrun(args, tmp_path, timeout=600):
    """Two CPU processes under torchrun. A collective that waits 120 s fails (the workers' process
    group timeout) and the whole process tree is killed at ``timeout``: a hang fails the test with
    the workers' output instead of holding CI, and leaves no worker behind."""
    p = _start_torchrun(args, tmp_path)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _script(name: str):
    """A module of scripts/ (not a package), imported from its file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_two_process_gloo_training_and_resume(tmp_path):
    out = tmp_path / "run"
    r = _torchrun(["-m", "photon_core.train", "--out", str(out), "--preset", "tiny", "--steps", "4",
                   "--scans-per-step", "1", "--questions-per-scan", "1", "--save-every", "2",
                   "--log-every", "1", "--pool", "0", "--warmup", "1", "--device", "cpu"], tmp_path)
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["phase"] for x in lines] == [1, 1, 2, 3]                  # the three phases in one short run
    assert all(x["loss"] == x["loss"] for x in lines)                   # finite (not NaN)
    assert "band" in lines[2] and "band" in lines[3]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    state = json.loads((out / "last" / "train_state.json").read_text())
    assert state["step"] == 4
    # resume: continues at step 4 and runs to 6
    r2 = _torchrun(["-m", "photon_core.train", "--out", str(out), "--preset", "tiny", "--steps", "6",
                    "--scans-per-step", "1", "--questions-per-scan", "1", "--save-every", "2",
                    "--log-every", "1", "--pool", "0", "--warmup", "1", "--device", "cpu", "--resume"],
                   tmp_path)
    steps = [json.loads(x)["step"] for x in r2.stdout.splitlines() if x.startswith("{")]
    assert steps == [4, 5]


def test_two_process_sharded_evaluation(tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    _torchrun(["-m", "photon_core.eval", "--model", str(tiny_model_dir), "--device", "cpu", "--demo-split",
               "test", "--scans", "2", "--no-baselines", "--out", str(out)], tmp_path)
    m = json.loads((out / "metrics.json").read_text())
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert m["world_size"] == 2 and {p["scan"] for p in preds} == {0, 1}     # both shards merged
    assert m["n_questions"] == len([p for p in preds if not p["family"].startswith("_")]) > 0
    assert 0 <= m["keep_fraction_mean"] <= 1 and "existence" in m["families"]


def test_ctrl_c_under_torchrun_writes_one_report_of_every_ranks_rows(tiny_model_dir, tmp_path):
    """Ctrl-C reaches torchrun (its workers run in sessions of their own), which passes it on to every
    rank: each kept its rows in its own file and the user joined them by hand. Rank 0 now waits for the
    others' rows and writes one report of them all, marked interrupted; no rank file is left."""
    import queue
    import threading
    import time

    out = tmp_path / "eval"
    p = _start_torchrun(["-m", "photon_core.eval", "--model", str(tiny_model_dir), "--device", "cpu",
                         "--demo-split", "test", "--scans", "40", "--no-baselines", "--out", str(out)],
                        tmp_path)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stderr], daemon=True).start()
    seen, err, deadline = set(), [], time.monotonic() + 300
    try:
        while seen != {0, 1}:                   # each rank answered its first scan's questions
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("no progress from both ranks in 300 s:\n" + "".join(err)[-3000:])
            err.append(line)
            if m := re.match(r"rank (\d): 1 of 20 scans evaluated", line):
                seen.add(int(m.group(1)))
        os.kill(p.pid, signal.SIGINT)           # as Ctrl-C in the terminal reaches torchrun
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    time.sleep(0.5)
    while not lines.empty():
        err.append(lines.get())
    log = "".join(err)[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["ranks_merged"] == [0, 1], log
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["scan"] % 2 for p in preds} == {0, 1} and m["n_questions"] > 0
    assert not list(out.glob("predictions.rank*.jsonl")), log


def test_demo_evaluation_with_baselines_and_curves_rescores_from_its_answers(tiny_model_dir):
    """The whole demo path (matched baselines, a curve, noise rows, the organ audit) keeps every answer
    text beside its score, so ``rescore`` recomputes the same summary from the texts alone; and a
    changed answer changes it."""
    import copy

    from photon_core.eval.demo import evaluate_demo
    from photon_core.eval.report import BASELINES, rescore, summarise
    from photon_core.inference.predictor import Predictor
    rows = evaluate_demo(Predictor(tiny_model_dir, device="cpu"), "test", scans=1, seed=0, curve=(50,))
    qa = [r for r in rows if not r["family"].startswith("_")]
    assert qa and all(f"{m}_prediction" in r for r in qa if r["kept"] for m in BASELINES)
    assert all(set(r["curve_predictions"]) == {f"{m}:50" for m in ("top_k",) + BASELINES} for r in qa)
    assert any(r["family"] == "_noise" and "prediction" in r for r in rows)
    before = summarise(rows)
    assert before["curve_macro"] and all(f"{m}_matched" in before for m in BASELINES)
    again = copy.deepcopy(rows)
    for r in again:                                   # scores recomputed from nothing but the texts
        r.pop("scores", None)
        for m in BASELINES:
            r.pop(f"{m}_scores", None)
        if "curve" in r:
            r["curve"] = {}
    rescore(again)
    assert summarise(again) == before
    closed = next(r for r in again if r["family"] == "existence")
    closed["prediction"] = closed["answer"] if closed["scores"]["accuracy"] == 0 else "maybe"
    rescore(again)
    assert (summarise(again)["families"]["existence"]["accuracy"]
            != before["families"]["existence"]["accuracy"])


def test_score_mode_reproduces_a_committed_report_and_reads_other_models_predictions(tmp_path):
    from photon_core.eval.evaluate import main
    report = ROOT / "reports" / "demo_test"
    main(["--score", str(report / "predictions.jsonl"), "--out", str(tmp_path / "again")])
    want, got = (json.loads((d / "metrics.json").read_text()) for d in (report, tmp_path / "again"))
    assert got["scored_from"] == "predictions.jsonl" and "model" not in got
    for key in ("keep_fraction_mean", "asked_organ_coverage_mean", "jaccard_two_organ_prompts_mean",
                "noise_closed_accuracy", "curve_macro"):
        assert got[key] == pytest.approx(want[key]), key
    for key in ("families", "fastv_matched"):
        assert set(got[key]) == set(want[key])
        for f in want[key]:
            assert got[key][f] == pytest.approx(want[key][f]), (key, f)
    # predictions of another model: no token counts, defaults for family and answer type
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(json.dumps(r) for r in [
        {"answer": "yes", "prediction": "Yes, there is.", "answer_type": "closed", "family": "existence"},
        {"answer": "no", "prediction": "yes", "answer_type": "closed", "family": "existence"},
        {"answer": "20 mm", "prediction": "about 19 mm", "answer_type": "numeric", "family": "measurement"},
        {"answer": "left kidney", "prediction": "the left kidney"}]) + "\n\n")
    main(["--score", str(other), "--out", str(tmp_path / "other")])
    m = json.loads((tmp_path / "other" / "metrics.json").read_text())
    assert m["families"]["existence"]["accuracy"] == 0.5 and m["families"]["measurement"]["mra"] == 0.9
    assert m["families"]["all"]["rouge1"] == pytest.approx(0.8) and m["keep_fraction_mean"] is None
    assert "keep_fraction_mean" not in (tmp_path / "other" / "metrics.md").read_text()
    # a file it cannot score: a usage error naming the line, nothing written
    bad = tmp_path / "bad.jsonl"
    for text, says in (('{"answer": "yes"}\n', "bad.jsonl:1: no 'prediction' field"),
                       ('{"answer": "yes", "prediction": "no"}\n[1]\n', "bad.jsonl:2: not a JSON object"),
                       ("{oops\n", "bad.jsonl:1: not valid JSON"), ("\n", "no predictions")):
        bad.write_text(text)
        r = subprocess.run([sys.executable, "-m", "photon_core.eval", "--score", str(bad), "--out",
                            str(tmp_path / "bad")], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 2 and says in r.stderr and not (tmp_path / "bad").exists(), r.stderr
    r = subprocess.run([sys.executable, "-m", "photon_core.eval", "--score", str(other),
                        "--demo-split", "test", "--out", str(tmp_path / "bad")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "runs no model" in r.stderr


def test_metrics():
    assert closed_correct("Yes, there is.", "yes") and not closed_correct("no", "yes")
    assert mra("20 mm", "20 mm") == 1.0 and mra("no number", "20") == 0.0
    assert mra("22", "20") == pytest.approx(0.8)        # rel. error 0.1 < 1−θ for θ ≤ 0.85: 8 of 10
    assert mra("30", "20") == pytest.approx(0.0)        # rel. error 0.5 is not < 0.5
    # exact at the thresholds, where floats would decide by rounding (1 − 0.95 > 0.05 in floating point)
    assert [mra(p, "20") for p in ("19", "21", "23", "26", "14")] == [0.9, 0.9, 0.7, 0.4, 0.4]
    assert mra("3.3 cm", "3.0 cm") == 0.8 and mra("-5", "-4") == 0.5 and mra("0", "0") == 1.0
    assert mra("1,250 ml", "1250") == 1.0 and mra("2, 3 and 4", "2") == 1.0 and mra("1,2500", "1") == 1.0
    assert (bleu1("left kidney", "left kidney") == 1.0
            and rouge1("the left kidney", "left kidney") == pytest.approx(0.8))
    agg = aggregate([dict(family="a", scores={"accuracy": 1.0}), dict(family="a", scores={"accuracy": 0.0}),
                     dict(family="b", scores={"mra": 0.5})])
    assert agg["a"]["accuracy"] == 0.5 and agg["macro"] == 0.5
    from photon_core.eval.metrics import balanced_accuracy
    always_no = [dict(family="existence", answer_type="closed", answer=a,
                      scores={"accuracy": float(a == "no")})
                 for a in ["no"] * 9 + ["yes"]]
    assert aggregate(always_no)["existence"]["accuracy"] == 0.9
    assert balanced_accuracy(always_no) == {"existence": 0.5}      # the prior alone scores chance
    mixed = aggregate([dict(family="obs", scores={"exact": 1.0}),
                       dict(family="obs", scores={"accuracy": 0.0}),
                       dict(family="obs", scores={"accuracy": 1.0})])
    assert mixed["obs"]["n"] == 3 and mixed["obs"]["accuracy"] == 0.5 and mixed["obs"]["exact"] == 1.0
    from photon_core.eval.metrics import auroc
    assert auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert auroc([0.1, 0.9], [True, False]) == 0.0
    assert auroc([0.5, 0.5, 0.5], [True, False, False]) == 0.5        # a constant score: chance
    assert auroc([3, 1, 2, 0], [True, True, False, False]) == 0.75
    with pytest.raises(ValueError):
        auroc([1.0, 2.0], [True, True])


def test_low_resolution_curriculum_then_init_from(tmp_path):
    """Stage A at 64 visual tokens (downsample 2.5), stage B from its weights at the real 1,000 tokens."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    common = ["--preset", "tiny", "--scans-per-step", "1", "--questions-per-scan", "2", "--pool", "0",
              "--warmup", "1", "--log-every", "1", "--device", "cpu", "--guide", "0.1", "--aux", "0.5"]
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "photon_core.train", "--out", str(a), "--steps", "2",
                        "--downsample", "2.5", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    cfg_a = json.loads((a / "model" / "config.json").read_text())
    (a / "model" / "config.json").write_text(json.dumps({**cfg_a, "rope_theta": 10.0}))   # not the preset's
    r = subprocess.run([sys.executable, "-m", "photon_core.train", "--out", str(b), "--steps", "2",
                        "--init-from", str(a / "model"), "--phase2-start", "0", "--phase3-start", "0.5",
                        "--keep-guide", "1", "--contrast-guide", "1", *common],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["phase"] for x in lines] == [2, 3] and all(x["loss"] == x["loss"] for x in lines)
    assert all("aux" in x and "guide" in x and "keep_guide" in x and "contrast" in x
               for x in lines if not x["robust"])                                        # training-only terms
    from safetensors.torch import load_file
    wa = load_file(str(a / "model" / "model.safetensors"))
    assert (b / "model" / "tokenizer.json").read_bytes() == (a / "model" / "tokenizer.json").read_bytes()
    assert json.loads((b / "model" / "config.json").read_text())["rope_theta"] == 10.0   # A's configuration
                                                                                         # kept
    # stage B started from stage A: after 2 small steps its weights are still close to A's, far from a
    # fresh init
    wb = load_file(str(b / "model" / "model.safetensors"))
    k = "visual.vision_patch_embed.proj.weight"
    assert (wb[k] - wa[k]).abs().mean() < 0.5 * wa[k].abs().mean()


def test_vision_only_prestage_then_frozen_vision(tmp_path, capsys, request):
    """--vision-only moves the vision tower alone (token supervision + max-pooled "any finding");
    --freeze-vision then trains everything but the vision tower. The trainer's command line runs in
    this process (the same `main` as `python -m photon_core.train`, whose start the torchrun tests
    cover), so its nine runs share one preparation of the sample cases."""
    import torch
    from safetensors.torch import load_file

    from photon_core.train.loop import main
    request.addfinalizer(lambda n=torch.get_num_threads(): torch.set_num_threads(n))   # main sets them
    common = ["--preset", "tiny", "--scans-per-step", "2", "--questions-per-scan", "2", "--pool", "0",
              "--warmup", "1", "--log-every", "1", "--device", "cpu", "--downsample", "2.5", "--steps", "2"]

    def run(out, *extra):
        capsys.readouterr()
        main(["--out", str(out), *common, *extra])
        return [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")], \
            load_file(str(out / "model" / "model.safetensors"))

    _, w0 = run(tmp_path / "init", "--lr", "0")
    lines, wa = run(tmp_path / "a", "--vision-only", "--aux", "1",
                    "--init-from", str(tmp_path / "init" / "model"))
    assert all(set(x) >= {"aux"} and x["loss"] == x["aux"] for x in lines)
    vision = [k for k in w0 if k.startswith("visual.")]
    assert vision and all(not k.startswith("visual.") for k in set(w0) - set(vision))
    assert all(bool((wa[k] == w0[k]).all()) for k in w0 if k not in vision)        # LLM and ITS untouched
    assert any(not bool((wa[k] == w0[k]).all()) for k in vision)                    # the tower moved
    # on depth slabs, the patch embedding at 10× the learning rate: the tower alone moves, and the
    # training-only head is checkpointed with it and restored by --resume
    lines, ws = run(tmp_path / "s", "--vision-only", "--aux", "1", "--slabs", "2", "--patch-embed-lr", "10",
                    "--save-every", "1", "--init-from", str(tmp_path / "init" / "model"))
    assert all(x["loss"] == x["aux"] for x in lines)
    assert all(bool((ws[k] == w0[k]).all()) for k in w0 if k not in vision)
    embed = "visual.vision_patch_embed.proj.weight"
    others = [k for k in vision if k != embed and not bool((ws[k] == w0[k]).all())]
    assert others and (ws[embed] - w0[embed]).abs().mean() > 3 * (wa[embed] - w0[embed]).abs().mean()
    head = load_file(str(tmp_path / "s" / "last" / "aux_head.safetensors"))
    run(tmp_path / "s", "--vision-only", "--aux", "1", "--slabs", "2", "--patch-embed-lr", "10",
        "--steps", "3", "--resume", "--lr", "0")                    # (the last --steps wins)
    resumed = load_file(str(tmp_path / "s" / "last" / "aux_head.safetensors"))
    assert all(torch.equal(head[k], resumed[k]) for k in head)      # lr 0: the saved head came back unchanged
    # counterfactual pairs on slabs: a scan with findings and its clean twin (the tower alone moves)
    lines, wc = run(tmp_path / "cf", "--vision-only", "--aux", "1", "--aux-standardise", "--slabs", "2",
                    "--counterfactual", "1", "--init-from", str(tmp_path / "init" / "model"))
    assert all(x["counterfactual"] and x["loss"] == x["aux"] for x in lines)
    assert all(bool((wc[k] == w0[k]).all()) for k in w0 if k not in vision)
    _, wb = run(tmp_path / "b", "--freeze-vision", "--init-from", str(tmp_path / "a" / "model"))
    assert all(bool((wb[k] == wa[k]).all()) for k in vision)
    assert any(not bool((wb[k] == wa[k]).all()) for k in wb if k not in vision)
    # --fold-scans with the tower frozen: the merger's last Linear is the only part of it that changes
    _, wf = run(tmp_path / "f", "--freeze-vision", "--fold-scans", "2",
                "--init-from", str(tmp_path / "a" / "model"))
    folded = {k for k in vision if not bool((wf[k] == wa[k]).all())}
    assert folded == {"visual.merger.mlp.2.weight", "visual.merger.mlp.2.bias"}
    capsys.readouterr()
    with pytest.raises(SystemExit):                                                # nothing to train on
        main(["--out", str(tmp_path / "c"), *common, "--vision-only"])
    assert "give --aux > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):                                                # slabs: the tower alone
        main(["--out", str(tmp_path / "c"), *common, "--aux", "1", "--slabs", "2"])
    assert "give --vision-only" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_bleu1_and_rouge1_reproduce_their_reference_packages():
    """BLEU-1 as nltk's sentence_bleu (weights (1,)) and ROUGE-1 F as the rouge-score package give them
    (run in a scratch environment, see tests/fixtures/text_metrics/make.py), on pairs that exercise
    clipping, the brevity penalty, case, punctuation, hyphens, decimals and empty sides."""
    from photon_core.eval.metrics import normalise
    e = json.loads((ROOT / "tests" / "fixtures" / "text_metrics" / "expected.json").read_text())["pairs"]
    assert len(e) >= 20
    for r in e:
        assert normalise(r["prediction"]).split() == r["prediction_tokens"]        # BLEU's tokens
        assert normalise(r["reference"]).split() == r["reference_tokens"]
        assert bleu1(r["prediction"], r["reference"]) == pytest.approx(r["bleu1"], abs=1e-12), r
        assert rouge1(r["prediction"], r["reference"]) == pytest.approx(r["rouge1"], abs=1e-12), r
    assert rouge1("T2-weighted", "t2 weighted") == 1.0 and bleu1("T2-weighted", "t2 weighted") == 0.0


def test_bertscore_reproduces_the_reference_package():
    """BERTScore P, R and F1 as the reference package (bert-score 0.3.13, run in a scratch environment
    with transformers 4.46, see tests/fixtures/bertscore/make.py) computes them, with a tiny random
    local BERT: an exact match scores 1, an empty candidate 0."""
    from photon_core.eval.metrics import bertscore
    folder = ROOT / "tests" / "fixtures" / "bertscore"
    e = json.loads((folder / "expected.json").read_text())
    out = bertscore([c for c, _ in e["pairs"]], [r for _, r in e["pairs"]], str(folder),
                    num_layers=e["num_layers"])
    for key, ref in (("bertscore_p", e["P"]), ("bertscore_r", e["R"]), ("bertscore_f1", e["F"])):
        assert [o[key] for o in out] == pytest.approx(ref, abs=1e-5)
    assert out[0]["bertscore_f1"] == pytest.approx(1.0) and out[5]["bertscore_f1"] == 0.0
    assert (bertscore(["left kidney"], ["left kidney"], str(folder))[0]["bertscore_f1"]
            == pytest.approx(1.0))  # last layer


def test_evaluator_adds_bertscore_to_open_answers():
    from photon_core.eval.report import add_bertscore, markdown, summarise
    rows = [dict(family="image_observation", answer_type="open", question="q", answer="left kidney",
                 prediction="left kidney", kept=100, scores={"exact": 1.0}),
            dict(family="image_observation", answer_type="open", question="q", answer="liver",
                 prediction="", kept=100, scores={"exact": 0.0}),
            dict(family="existence", answer_type="closed", question="q", answer="no", prediction="no",
                 kept=100, scores={"accuracy": 1.0})]
    add_bertscore(rows, str(ROOT / "tests" / "fixtures" / "bertscore"), 2)
    assert [r["scores"].get("bertscore_f1") for r in rows] == [pytest.approx(1.0), 0.0, None]
    md = markdown(summarise(rows))
    assert "BERTScore F1" in md and "| 0.500 |" in md


def test_case_answers(tiny_model_dir, capsys):
    """scripts/case_answers.py: every suggested question of a bundled case answered through the app's
    engine, with the kept count and the asked organ's retention from the case's label map."""
    mod = _script("case_answers")
    case = json.loads((ROOT / "sample_cases" / "cases.json").read_text())["cases"][0]
    rows = mod.main(["--model", str(tiny_model_dir), "--cases", case["id"], "--budget", "25%"])
    assert [r["question"] for r in rows] == case["questions"]
    assert all(r["kept"] == 250 and r["answer"] for r in rows)
    left = next(r for r in rows if "left kidney" in r["question"])
    assert list(left["asked_organs"]) == ["kidney_left"] and 0 <= left["asked_organs"]["kidney_left"] <= 1
    assert "| asked organ's blocks kept |" in capsys.readouterr().out
    with pytest.raises(SystemExit):                            # an unknown case id is an error,
                                                               # not an empty table
        mod.main(["--model", str(tiny_model_dir), "--cases", "no_such_case"])


def test_answer_logprobs_agree_with_generation(tiny_model_dir):
    """`Predictor.answer_logprobs` (the diagnostics' read-out) is the prefill the generator decodes:
    its arg-max is the first generated token, for each question of a batch."""
    import torch

    from photon_core.inference.predictor import Predictor
    p = Predictor(tiny_model_dir, device="cpu")
    torch.manual_seed(0)
    p.set_volume(torch.rand(140, 280, 280))
    qs = ["Is there a lesion in the liver?", "How many lesions are in the left kidney?"]
    lp = p.answer_logprobs(qs, "25%")
    assert (lp.shape == (2, p.model.config.vocab_size)
            and torch.allclose(lp.exp().sum(-1), torch.ones(2), atol=1e-4))
    eos = p.model.config.eos_token_id
    for row, a in zip(lp.argmax(-1).tolist(), p.ask_many(qs, "25%", max_new_tokens=1)):
        assert a.text == ("" if row == eos else p.tokenizer.decode([row]))



TINY = ["--preset", "tiny", "--scans-per-step", "1", "--questions-per-scan", "1", "--pool", "0",
        "--warmup", "1", "--log-every", "1", "--device", "cpu", "--downsample", "2.5"]


def test_train_settings_are_checked_before_anything_is_written(tmp_path, capsys):
    """Mistakes a researcher makes are one usage line (exit 2) before a model is built: before, --lr nan
    trained to NaN weights with exit 0, --warmup 0 divided by zero, --preset tinyy built the demo size,
    --out over a finished run overwrote its weights, a missing --init-from was a traceback."""
    from photon_core.train.loop import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "done" / "model").mkdir(parents=True)
    for extra, says in ((["--lr", "nan"], "a learning rate is a finite number"),
                        (["--steps", "0"], "count steps: 1 or more"), (["--save-every", "0"], "count steps"),
                        (["--preset", "tinyy"], "--preset 'tinyy': demo or tiny"),
                        (["--phase2-start", "0.9", "--phase3-start", "0.5"], "0 ≤ phase 2 ≤ phase 3 ≤ 1"),
                        (["--device", "gpu"], "--device 'gpu': auto, cpu, cuda or cuda:N"),
                        (["--out", str(tmp_path / "file")], "is a file; name a folder"),
                        (["--out", str(tmp_path / "done")], "holds a run already .* give --resume"),
                        (["--init-from", str(tmp_path / "nothing")], "not a model folder")):
        out = ["--out", str(tmp_path / "new")] if "--out" not in extra else []
        with pytest.raises(SystemExit) as e:
            main([*TINY, *out, *extra])
        assert e.value.code == 2
        assert re.search(says, capsys.readouterr().err), (extra, says)
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit, match="holds no checkpoint to resume"):
        main([*TINY, "--out", str(tmp_path / "typo"), "--resume", "--steps", "2"])


def test_resume_takes_the_newest_complete_checkpoint_and_keeps_its_settings(tmp_path, capsys, monkeypatch):
    """A save replaces last/ by renaming: interrupted between the renames, the run is in last.tmp/ (and the
    older one in last.old/) — resume continues from there (it restarted at step 0). A resumed run keeps the
    settings that shape what trains; a NaN loss stops the run and keeps the last checkpoint."""
    from photon_core.train import loop

    out = tmp_path / "run"
    loop.main([*TINY, "--out", str(out), "--steps", "2", "--save-every", "1"])
    (out / "last").rename(out / "last.tmp")                          # the save's second rename never ran
    capsys.readouterr()
    loop.main([*TINY, "--out", str(out), "--steps", "3", "--resume"])
    steps = [json.loads(x)["step"] for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert steps == [2] and json.loads((out / "last" / "train_state.json").read_text())["step"] == 3
    assert not (out / "last.old").exists()
    with pytest.raises(SystemExit, match=r"--resume: --freeze-vision True \(the checkpoint: False\)"):
        loop.main([*TINY, "--out", str(out), "--steps", "4", "--resume", "--freeze-vision"])
    real = loop.step_losses
    nan = float("nan")
    monkeypatch.setattr(loop, "step_losses", lambda *a, **k: {"x": sum(real(*a, **k).values()) * nan})
    with pytest.raises(SystemExit, match=r"The loss is nan at step 3 .* the checkpoint of step 3 is kept"):
        loop.main([*TINY, "--out", str(out), "--steps", "5", "--resume"])
