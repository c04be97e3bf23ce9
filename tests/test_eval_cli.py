"""The evaluator's command line (photon_core/eval/evaluate.py) as a user meets it: mistakes in the data
or the options refused in one line before a model loads, failed records counted and named, Ctrl-C
keeping the answers so far, the per-run and per-record keep budget.

A stand-in predictor (`FakePredictor`) answers "yes" with half the tokens kept, so these tests check
the CLI's structure and counts in milliseconds; one test asks a real tiny model.
"""
import csv
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from photon_core.eval import evaluate
from photon_core.eval.datasets import DatasetError, read_records
from photon_core.eval.official import rad3d
from photon_core.eval.report import read_predictions, write_report


class FakePredictor:
    """What the evaluator uses of `Predictor`; ``interrupt_at`` raises KeyboardInterrupt on that ask."""
    name, device = "fake", "cpu"
    checkpoint = SimpleNamespace(to_dict=lambda: {"source": "fake"})
    interrupt_at: int | None = None
    last = None

    def __init__(self, *args, **kwargs):
        self.asked, self.new_tokens = [], []
        FakePredictor.last = self

    def supports(self, budget):
        return None

    def set_volume(self, volume, prior=None):
        pass

    def ask(self, question, budget=None, max_new_tokens=32):
        self.asked.append((question, budget))
        self.new_tokens.append(max_new_tokens)
        if len(self.asked) == self.interrupt_at:
            raise KeyboardInterrupt
        if len(question) > 1000:
            raise ValueError(f"The question is {len(question)} characters long; the limit is 1000.")
        return SimpleNamespace(text="yes", kept=500, total=1000, budget=str(budget or "auto"))


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the mistake was found")


@pytest.fixture(autouse=True)
def _signals_kept():
    """An interrupted run ignores further signals as it writes its files and exits; the test process
    goes on, with its own handlers back."""
    import signal

    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in kept.items():
        signal.signal(s, handler)


@pytest.fixture
def fake(monkeypatch):
    FakePredictor.interrupt_at = None
    monkeypatch.setattr(evaluate, "Predictor", FakePredictor)
    return FakePredictor


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(evaluate, "Predictor", _no_model)


def _csv(path, rows, **kw):
    with open(path, "w", newline="", **kw) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def _scans(tmp_path, names):
    for n in names:
        np.save(tmp_path / n, np.zeros((2, 2, 2), dtype=np.float32))


def _run(argv):
    """main(argv); the exit status (0 when it returns)."""
    try:
        evaluate.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code
    except KeyboardInterrupt:
        return "KeyboardInterrupt escaped"
    return 0


def _refused(capsys, argv, *words):
    """The run is refused with exit status 2 and one line "error: ..." holding ``words``."""
    assert _run(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for w in words:
        assert w in err, err
    return err


Q = "Is there a lesion in the liver?"


@pytest.mark.parametrize("case", ["misnamed", "semicolon", "blank_answer", "broken_jsonl", "missing",
                                  "scan_as_data", "latin1", "bad_columns", "unknown_field"])
def test_data_mistakes_are_one_line_naming_file_and_row_before_the_model_loads(case, tmp_path, capsys,
                                                                              no_model):
    out, cols = tmp_path / "out", []
    if case == "misnamed":
        data, words = _csv(tmp_path / "m.csv", [{"Volume Name": "a.npy", "Question": Q, "Answer": "no"}]), \
            ["m.csv:2", "no image column", "--columns image="]
    elif case == "semicolon":
        data = tmp_path / "s.csv"
        data.write_text(f"image;question;answer\na.npy;{Q};no\n")
        words = ["s.csv:2", "separated by ';'"]
    elif case == "blank_answer":
        data = _csv(tmp_path / "b.csv", [{"image": "a.npy", "question": Q, "answer": "no"},
                                         {"image": "a.npy", "question": Q, "answer": ""}])
        words = ["b.csv:3", "answer (column 'answer') is empty"]
    elif case == "broken_jsonl":
        data = tmp_path / "b.jsonl"
        good = json.dumps({"image": "a.npy", "question": Q, "answer": "no"})
        data.write_text(f"{good}\n{good}\n{{broken\n")
        words = ["b.jsonl:3", "not valid JSON"]
    elif case == "missing":
        data, words = tmp_path / "nothere.csv", ["nothere.csv", "no such file"]
    elif case == "scan_as_data":
        data = tmp_path / "ct.nii.gz"
        data.write_bytes(b"\x1f\x8b\x08\x00\xff\xfe")
        words = ["ct.nii.gz", "expected a .jsonl, .json or .csv"]
    elif case == "latin1":
        data = tmp_path / "l.csv"
        data.write_bytes(f"image,question,answer\na.npy,{Q},non\na.npy,Y a-t-il une lésion ?,non\n"
                         .encode("latin-1"))
        words = ["l.csv:3", "not UTF-8"]
    else:
        data = _csv(tmp_path / "g.csv", [{"image": "a.npy", "question": Q, "answer": "no"}])
        cols, words = (["image"], ["field=COLUMN"]) if case == "bad_columns" else \
            (["picture=image"], ["unknown field 'picture'"])
    _refused(capsys, ["--data", data, "--out", out, *(["--columns", *cols] if cols else [])], *words)
    assert not out.exists()


def test_failed_records_are_counted_named_and_left_out_of_the_keep_mean(tmp_path, capsys, fake):
    _scans(tmp_path, ["a.npy", "b.npy"])
    data = _csv(tmp_path / "set.csv", [{"image": n, "question": Q, "answer": "yes", "space": "model"}
                                       for n in ("a.npy", "b.npy", "gone.npy")])
    out = tmp_path / "out"
    assert _run(["--data", data, "--out", out]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 records failed" in err and "gone.npy" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_questions"] == 3 and m["n_errors"] == 1
    assert [f["image"] for f in m["failed"]] == ["gone.npy"] and m["failed"][0]["error"]
    assert m["keep_fraction_mean"] == pytest.approx(0.5)        # the answered rows only (kept 500 of 1000)
    assert m["families"]["set"]["accuracy"] == pytest.approx(2 / 3)    # the failed one scored 0
    md = (out / "metrics.md").read_text()
    assert "1 of 3 questions failed" in md and "scored 0" in md and "gone.npy" in md


def test_every_record_failing_exits_non_zero(tmp_path, capsys, fake):
    data = _csv(tmp_path / "set.csv", [{"image": n, "question": Q, "answer": "yes", "space": "model"}
                                       for n in ("gone1.npy", "gone2.npy")])
    assert _run(["--data", data, "--out", tmp_path / "out"]) == 1
    assert "every record failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["n_errors"] == 2


def test_a_question_over_the_length_limit_is_an_error_row_not_the_end_of_the_run(tmp_path, capsys,
                                                                                  tiny_model_dir):
    """With a real (tiny) model: the prompt's own length check fails one record; the others are asked."""
    _scans(tmp_path, ["a.npy"])
    np.save(tmp_path / "a.npy", np.zeros((140, 280, 280), dtype=np.float32))
    long_q = "Is there a lesion in the liver? " + "Please look carefully. " * 60
    data = _csv(tmp_path / "set.csv", [{"image": "a.npy", "question": q, "answer": "no", "space": "model"}
                                       for q in (Q, long_q, Q)])
    out = tmp_path / "out"
    assert _run(["--model", tiny_model_dir, "--device", "cpu", "--data", data, "--out", out]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in rows] == [False, True, False]
    assert "limit is 1000" in rows[1]["error"] and rows[1]["question"] == long_q
    assert "1 of 3 records failed" in capsys.readouterr().err


def test_ctrl_c_writes_the_report_of_the_rows_so_far(tmp_path, capsys, fake):
    _scans(tmp_path, ["a.npy"])
    data = _csv(tmp_path / "set.csv", [{"image": "a.npy", "question": f"{Q} ({i})", "answer": "yes",
                                        "space": "model"} for i in range(5)])
    out = tmp_path / "out"
    fake.interrupt_at = 3
    assert _run(["--data", data, "--out", out]) == 130
    assert "interrupted" in capsys.readouterr().err
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["n_questions"] == 2
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert "Interrupted" in (out / "metrics.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md", "predictions.jsonl"]


def test_sigterm_writes_the_report_of_the_rows_so_far_and_says_where_it_is(tmp_path, capsys, fake,
                                                                          monkeypatch):
    """A batch scheduler's stop (SIGTERM; torchrun also passes one on to its workers) killed the run
    and every answer with it. It is now met as Ctrl-C is (exit 143, as a shell reports SIGTERM); a
    line on stderr after each scan's questions says how far it got; the handler is put back after."""
    import signal

    _scans(tmp_path, ["a.npy", "b.npy", "c.npy"])
    data = _csv(tmp_path / "set.csv", [{"image": f"{s}.npy", "question": f"{Q} ({i})", "answer": "yes",
                                        "space": "model"} for s in "abc" for i in range(2)])
    real_ask, stop = FakePredictor.ask, [True]

    def ask(self, question, budget=None, max_new_tokens=32):
        if len(self.asked) == 4 and stop[0]:            # the fifth question: scans a and b answered
            os.kill(os.getpid(), signal.SIGTERM)
        return real_ask(self, question, budget, max_new_tokens)

    monkeypatch.setattr(FakePredictor, "ask", ask)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert _run(["--data", data, "--out", out]) == 143
    err = capsys.readouterr().err
    assert "1 of 3 scans evaluated (2 questions)" in err and "interrupted" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["n_questions"] == 4
    assert signal.getsignal(signal.SIGTERM) is before
    stop[0] = False
    assert _run(["--data", data, "--out", tmp_path / "whole"]) == 0
    assert "3 of 3 scans evaluated (6 questions)" in capsys.readouterr().err


def test_an_interrupted_rank_0_merges_the_rows_the_other_ranks_wrote(tmp_path, capsys, monkeypatch):
    """Under torchrun every rank is stopped at once and kept its rows in its own file, which the user had
    to join and --score by hand: rank 0 now waits for the others' files (up to MERGE_WAIT_S) and writes
    the report of them all; a rank that wrote nothing in time is named, its file (if it comes) kept
    apart; a file left by an earlier run is not this run's."""
    import time
    from types import SimpleNamespace

    monkeypatch.setattr(evaluate, "MERGE_WAIT_S", 0.5)
    out = tmp_path / "out"
    out.mkdir()
    args = SimpleNamespace(out=out, bertscore_model=None, bertscore_layers=None, protocol=None)
    row = lambda n: {"question": Q, "answer": "yes", "prediction": "yes", "family": "existence",  # noqa: E731
                     "answer_type": "closed", "kept": 10, "total": 20, "scan": n}
    stale = out / "predictions.rank2.jsonl"
    stale.write_text(json.dumps(row(99)) + "\n")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    started = time.time()
    with pytest.raises(SystemExit) as e:
        evaluate._interrupted([row(1), row(3)], args, {}, 1, 3, started, KeyboardInterrupt())
    assert e.value.code == 130
    with pytest.raises(SystemExit) as e:
        evaluate._interrupted([row(0)], args, {}, 0, 3, started, evaluate.Terminated())
    assert e.value.code == 143
    m = json.loads((out / "metrics.json").read_text())
    assert m["interrupted"] is True and m["ranks_merged"] == [0, 1] and m["ranks_missing"] == [2]
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["scan"] for r in rows) == [0, 1, 3]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md", "predictions.jsonl",
                                                    "predictions.rank2.jsonl"]
    assert "rank 2 wrote no rows" in capsys.readouterr().err
    # interrupted before any rank answered: nothing written, and no empty rank file left behind
    empty = tmp_path / "empty"
    empty.mkdir()
    args.out = empty
    for rank in (1, 0):
        with pytest.raises(SystemExit):
            evaluate._interrupted([], args, {}, rank, 2, time.time(), KeyboardInterrupt())
    assert list(empty.iterdir()) == []
    assert "nothing written" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "header_only", "scans_0", "scans_negative"])
def test_nothing_to_evaluate_is_refused_before_the_model_loads(case, tmp_path, capsys, no_model):
    out = tmp_path / "out"
    if case in ("empty", "header_only"):
        data = tmp_path / "d.csv"
        data.write_text("" if case == "empty" else "image,question,answer\n")
        _refused(capsys, ["--data", data, "--out", out], "no records")
    else:
        _refused(capsys, ["--demo-split", "test", "--scans", 0 if case == "scans_0" else -5, "--out", out],
                 "--scans")
    assert not out.exists()


def test_dry_run_with_the_demo_split_says_what_it_would_do_and_stops(tmp_path, capsys, no_model):
    out = tmp_path / "out"
    assert _run(["--demo-split", "val", "--scans", 3, "--pairs", 1, "--dry-run", "--out", out]) == 0
    said = capsys.readouterr().out
    assert "would evaluate 3 scans and 1 temporal pairs of the demo split 'val'" in said
    assert not out.exists()


def test_out_naming_a_file_is_refused_before_the_model_loads(tmp_path, capsys, no_model):
    (tmp_path / "afile").write_text("x")
    data = _csv(tmp_path / "g.csv", [{"image": "a.npy", "question": Q, "answer": "no"}])
    _refused(capsys, ["--data", data, "--out", tmp_path / "afile"], "is a file")
    _refused(capsys, ["--demo-split", "test", "--scans", 1, "--out", tmp_path / "afile"], "is a file")


def test_a_report_is_written_only_once_every_figure_is_computed(tmp_path, monkeypatch):
    """A protocol that fails leaves the folder as the last run left it: no new predictions beside old
    metrics."""
    out = tmp_path / "out"
    rows = [{"question": Q, "answer": "yes", "prediction": "yes", "family": "t", "answer_type": "closed",
             "scores": {"accuracy": 1.0}}]
    write_report(rows, out, {"run": 1})
    before = {p.name: p.read_text() for p in out.iterdir()}

    def broken(*args):
        raise RuntimeError("protocol failed")
    monkeypatch.setattr("photon_core.eval.report.official", broken)
    with pytest.raises(RuntimeError):
        write_report(rows + rows, out, {"run": 2}, protocol="3d-rad")
    assert {p.name: p.read_text() for p in out.iterdir()} == before


def test_3drad_open_subtask_with_only_empty_predictions_is_null_with_a_reason(tmp_path, capsys):
    rows = [{"question": "Where?", "answer": "left kidney", "prediction": "", "error": "VolumeError: gone",
             "family": "task1", "subtype": "location", "answer_type": "open"},
            {"question": "Where?", "answer": "liver", "prediction": "liver", "family": "task2",
             "subtype": "location", "answer_type": "open"}]
    fig = rad3d(rows)
    assert fig["subtasks"]["task1/location"]["bleu"] is None and fig["subtasks"]["task1/location"]["note"]
    assert fig["tasks"]["task1"]["bleu"] is None and fig["tasks"]["task2"]["bleu"] == pytest.approx(1.0)
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _run(["--score", p, "--protocol", "3d-rad", "--out", tmp_path / "r"]) == 0
    md = (tmp_path / "r" / "metrics.md").read_text()
    assert "BLEU not computed" in md and "bleu n/a" in md
    official = json.loads((tmp_path / "r" / "metrics.json").read_text())["official"]
    assert official["tasks"]["task1"]["bleu"] is None


def test_score_reads_json_nulls_as_not_given(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"answer": "yes", "prediction": "yes", "family": null}\n'
                 '{"answer": "none", "prediction": null, "answer_type": "open", "family": 3}\n'
                 '{"answer": "no", "prediction": "no", "answer_type": null}\n')
    rows = read_predictions(p)
    assert [r["family"] for r in rows] == ["all", "3", "all"]
    assert rows[1]["prediction"] == "" and rows[2]["answer_type"] == "open"
    assert _run(["--score", p, "--out", tmp_path / "r"]) == 0
    scored = [json.loads(x) for x in (tmp_path / "r" / "predictions.jsonl").read_text().splitlines()]
    assert scored[1]["scores"]["exact"] == 0.0             # no answer is not the word "None"
    p.write_text('{"answer": null, "prediction": "None"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: the answer is null"):
        read_predictions(p)


def test_budget_for_every_record_unless_a_record_names_its_own(tmp_path, capsys, fake):
    _scans(tmp_path, ["a.npy"])
    data = tmp_path / "set.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": "a.npy", "question": "first?", "answer": "yes", "space": "model"},
        {"image": "a.npy", "question": "second?", "answer": "yes", "space": "model", "budget": "full"}]))
    assert read_records(data)[1]["budget"] == "full"
    assert _run(["--data", data, "--budget", "25%", "--out", tmp_path / "out"]) == 0
    assert fake.last.asked == [("first?", "25%"), ("second?", "full")]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["budget"] == "25%"


def test_budget_and_curve_mistakes_are_refused_before_the_model_loads(tmp_path, capsys, no_model):
    data = _csv(tmp_path / "g.csv", [{"image": "a.npy", "question": Q, "answer": "no"}])
    out = tmp_path / "out"
    _refused(capsys, ["--data", data, "--budget", "lots", "--out", out], "--budget lots", "cannot read")
    _refused(capsys, ["--demo-split", "test", "--budget", "lots", "--out", out], "--budget lots")
    _refused(capsys, ["--data", data, "--curve", 100, 200, "--out", out], "--curve", "demo split")
    bad = _csv(tmp_path / "b.csv", [{"image": "a.npy", "question": Q, "answer": "no", "budget": "lots"}])
    with pytest.raises(DatasetError, match=r"b.csv:2: budget 'lots'"):
        read_records(bad)
    assert not out.exists()


def test_answers_are_decoded_as_long_as_the_other_commands_allow(tmp_path, capsys, fake):
    """--data answers were cut at 16 new tokens (photon-ask and the app: 32), with no option and no word of
    it, so a set's open answers were scored truncated. Now 32 by default, --max-new-tokens sets it (up to
    photon-ask's 256) and metrics.json records it."""
    _scans(tmp_path, ["a.npy"])
    data = tmp_path / "set.jsonl"
    data.write_text(json.dumps({"image": "a.npy", "question": Q, "answer": "no", "space": "model"}) + "\n")
    assert _run(["--data", data, "--out", tmp_path / "out"]) == 0
    assert fake.last.new_tokens == [32]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["max_new_tokens"] == 32
    assert _run(["--data", data, "--max-new-tokens", 200, "--out", tmp_path / "long"]) == 0
    assert fake.last.new_tokens == [200]
    FakePredictor.last = None
    capsys.readouterr()                                 # (the runs' progress lines above)
    _refused(capsys, ["--data", data, "--max-new-tokens", 300, "--out", tmp_path / "x"], "--max-new-tokens")
    _refused(capsys, ["--demo-split", "test", "--max-new-tokens", 0, "--out", tmp_path / "x"], "1 to 256")
    assert FakePredictor.last is None                   # refused before a model was built
