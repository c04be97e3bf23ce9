"""External VQA set readers: our JSONL, CSV per task (3D-RAD-style), JSON list (DeepTumorVQA-style)."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from photon_core.eval.datasets import DatasetError, parse_columns, read_records


def _csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_csv_folder_one_task_per_file(tmp_path):
    d = tmp_path / "sets"
    d.mkdir()
    _csv(d / "existence_detection.csv",
         [{"VolumeName": "a.nii.gz", "Question": "Is there a cyst?", "Answer": "Yes"}])
    _csv(d / "medical_computation.csv",
         [{"VolumeName": "b.nii.gz", "Question": "Size?", "Answer": "23 mm"},
          {"VolumeName": "b.nii.gz", "Question": "Where?", "Answer": "left kidney"}])
    recs = read_records(d, images=tmp_path / "vols")
    assert [r["family"] for r in recs] == ["existence_detection", "medical_computation",
                                           "medical_computation"]
    assert [r["answer_type"] for r in recs] == ["closed", "numeric", "open"]
    assert recs[0]["image"] == str(tmp_path / "vols" / "a.nii.gz")


def test_json_list_with_overrides_and_options(tmp_path):
    f = tmp_path / "dtvqa.json"
    f.write_text(json.dumps({"data": [
        {"ct": "c.nii.gz", "q": "Which organ?", "Answer": "liver", "options": ["liver", "spleen"],
         "type": "recognition"},
        {"ct": "c.nii.gz", "q": "How many lesions?", "Answer": "3", "type": "counting"}]}))
    recs = read_records(f, parse_columns(["question=q"]))
    assert recs[0]["answer_type"] == "choice" and recs[0]["question"].endswith("Options: liver, spleen")
    assert recs[1]["answer_type"] == "numeric" and recs[1]["family"] == "counting"
    with pytest.raises(DatasetError, match="column 'Nope'"):
        read_records(f, parse_columns(["question=Nope"]))
    with pytest.raises(DatasetError, match=r"dtvqa.json: record 1: no question column"):
        read_records(f)                                          # 'q' is not a known alias
    with pytest.raises(DatasetError, match="field=COLUMN"):
        parse_columns(["question"])


def test_evaluate_a_csv_set_end_to_end(tiny_model_dir, tmp_path):
    """A small CSV set over a model-space volume and an unreadable one: predictions, metrics, an error row."""
    np.save(tmp_path / "vol.npy", np.random.default_rng(0).random((140, 280, 280), dtype=np.float32))
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    rows = [{"image": "vol.npy", "question": "Is there a lesion in the liver?", "answer": "no"},
            {"image": "vol.npy", "question": "How many lesions are in the liver?", "answer": "2"},
            {"image": "broken.nii.gz", "question": "Is there a lesion in the spleen?", "answer": "yes"}]
    data = tmp_path / "lesions.csv"
    _csv(data, [r | {"space": "model" if r["image"].endswith(".npy") else ""} for r in rows])
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "photon_core.eval", "--model", str(tiny_model_dir),
                        "--device", "cpu", "--data", str(data), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 3 and "error" in preds[2] and "error" not in preds[0]
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_questions"] == 3 and set(m["families"]) == {"lesions", "macro"}


def test_reader_mistakes_name_the_file_and_line(tmp_path):
    """Each mistake is a DatasetError naming where it is; a byte-order mark is read past."""
    q = "Is there a lesion in the liver?"
    cases = {"blank.csv": (f"image,question,answer\na.nii.gz,{q},no\na.nii.gz,{q},\n".encode(),
                           r"blank.csv:3: the answer \(column 'answer'\) is empty"),
             "semi.csv": (f"image;question;answer\na.nii.gz;{q};no\n".encode(),
                          r"semi.csv:2: .*separated by ';'"),
             "broken.jsonl": (b'{"image": "a", "question": "q", "answer": "no"}\n\n{broken\n',
                              r"broken.jsonl:3: not valid JSON"),
             "rec.json": (b'[{"image": "a", "question": "q", "answer": "no"}, 3]',
                          r"rec.json: record 2: expected"),
             "latin.csv": (f"image,question,answer\na.nii.gz,{q} é,non\n".encode("latin-1"),
                           r"latin.csv:2: not UTF-8"),
             "ct.nii.gz": (b"\x1f\x8b\x08\x00\xff", r"ct.nii.gz: expected a .jsonl, .json or .csv")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(DatasetError, match=message):
            read_records(tmp_path / name)
    with pytest.raises(DatasetError, match="nothere.csv: no such file"):
        read_records(tmp_path / "nothere.csv")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([{"image": "a", "question": q,
                                                                          "answer": "no"}]).encode())
    assert [r["answer"] for r in read_records(tmp_path / "bom.json")] == ["no"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"image": "a", "question": q, "answer": "no",
                                                  "budget": "full"}))
    assert read_records(tmp_path / "b.jsonl")[0]["budget"] == "full"        # kept for the evaluator
