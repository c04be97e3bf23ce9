"""Read VQA sets into the open record layout the evaluator uses.

Our JSONL: one record per line, {"image", "question", "answer", "family", "answer_type", "organ",
"meta"}; ``image`` relative to the file (or absolute); ``"space": "model"`` marks a model-space .npy;
``prior_image`` (optional) an earlier scan of the same patient for a question about change.

External sets a user has locally (nothing is downloaded):
* a CSV file, or a folder of CSV files, one per task (3D-RAD's layout: the task is the file name);
* a JSON file holding a list of records (DeepTumorVQA's layout), or a dict with a list under
  "data"/"questions"/"annotations".

Columns are matched case-insensitively against the aliases below (the first present wins);
``columns`` overrides them, e.g. {"image": "VolumeName", "answer": "Answer"}. The answer type
is taken from a column when present, else guessed: yes/no → closed, a number → numeric, options
given → choice, otherwise open. These readers are written to the public descriptions of those
sets; check the first records printed by ``--dry-run`` against your copy.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

ALIASES = {
    "image": ("image", "image_path", "img_path", "volume", "volume_name", "volumename", "volume_path", "ct",
              "ct_path", "nii", "file", "filename", "image_name", "path"),
    "question": ("question", "query", "prompt"),
    "answer": ("answer", "gt", "gt_answer", "label", "ground_truth", "answer_text"),
    "family": ("family", "task", "task_type", "question_type", "question type", "category", "type",
               "subtype"),
    "subtype": ("subtype", "subtask", "question_subtype", "question subtype"),
    "answer_type": ("answer_type", "question_format", "format", "closed_open", "answer_format",
                    "questiontype"),
    "organ": ("organ", "target_organ", "anatomy"),
    "options": ("options", "choices", "choice", "candidates"),
    "prior_image": ("prior_image", "prior", "prior_volume", "previous_image", "baseline_image", "image_prior"),
}
_NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d+)?\s*(mm|cm|ml|cc|%|hu)?\s*$", re.I)


class DatasetError(ValueError):
    pass


def _pick(row: dict, field: str, columns: dict) -> object:
    lower = {str(k).strip().lower(): v for k, v in row.items()}
    if field in columns:
        key = columns[field].strip().lower()
        if key not in lower:
            raise DatasetError(f"column {columns[field]!r} (for {field}) is not in the data; it has {sorted(lower)}")
        return lower[key]
    for alias in ALIASES[field]:
        if alias in lower and lower[alias] not in (None, ""):
            return lower[alias]
    return None


def _answer_type(answer: str, options, given) -> str:
    if given:
        g = str(given).strip().lower()
        if g in ("closed", "close", "close-ended", "closed-ended", "yes/no", "yesno", "binary"):
            return "closed"
        if g in ("choice", "multiple choice", "mcq", "multi-choice"):
            return "choice"
        if g in ("numeric", "number", "measurement", "count"):
            return "numeric"
        if g in ("open", "free", "open-ended"):
            return "open"
    if str(answer).strip().lower().strip(".") in ("yes", "no"):
        return "closed"
    if options:
        return "choice"
    if _NUMBER.match(str(answer)):
        return "numeric"
    return "open"


def _normalise(row: dict, columns: dict, base: Path, family_default: str) -> dict:
    image, question, answer = (_pick(row, f, columns) for f in ("image", "question", "answer"))
    missing = [n for n, v in (("image", image), ("question", question), ("answer", answer)) if v in (None, "")]
    if missing:
        raise DatasetError(f"a record lacks {', '.join(missing)} (columns seen: {sorted(row)}); "
                           f"name them with --columns field=COLUMN")
    options = _pick(row, "options", columns)
    if row.get("space") == "model":
        atype = row.get("answer_type") or _answer_type(answer, options, None)
    else:
        atype = _answer_type(answer, options, _pick(row, "answer_type", columns))
    resolve = lambda p: str(Path(str(p)) if Path(str(p)).is_absolute() else base / str(p))  # noqa: E731
    rec = dict(image=resolve(image), question=str(question), answer=str(answer),
               family=str(_pick(row, "family", columns) or family_default), answer_type=atype,
               organ=_pick(row, "organ", columns))
    subtype = _pick(row, "subtype", columns)
    if subtype not in (None, ""):
        rec["subtype"] = str(subtype)       # the official evaluators score per subtype (evaluate --protocol)
    prior = _pick(row, "prior_image", columns)
    if prior not in (None, ""):
        rec["prior_image"] = resolve(prior)
    if options:
        rec["question"] += f" Options: {options if isinstance(options, str) else ', '.join(map(str, options))}"
    if row.get("space"):
        rec["space"] = row["space"]
    return rec


def read_records(path: Path, columns: dict | None = None, images: Path | None = None) -> list[dict]:
    """Records from our JSONL, a CSV (or folder of CSVs) or a JSON list; images resolved against
    ``images`` (default: the data file's folder)."""
    path = Path(path)
    columns = columns or {}
    if not path.exists():
        raise DatasetError(f"{path} does not exist")
    if path.is_dir():
        files = sorted(path.rglob("*.csv"))
        if not files:
            raise DatasetError(f"{path} holds no .csv files")
        return [r for f in files for r in read_records(f, columns, images or path)]
    base = Path(images) if images else path.parent
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        return [_normalise(r, columns, base, path.stem) for r in rows]
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    elif suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            data = next((data[k] for k in ("data", "questions", "annotations", "items") if isinstance(data.get(k), list)),
                        None)
        if not isinstance(data, list):
            raise DatasetError(f"{path.name}: expected a JSON list of records (or one under 'data'/'questions')")
        rows = data
    else:
        raise DatasetError(f"{path.name}: expected .jsonl, .json or .csv (or a folder of .csv files)")
    return [_normalise(r, columns, base, path.stem) for r in rows]


def parse_columns(items: list[str]) -> dict:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise DatasetError(f"--columns takes field=COLUMN pairs, got {it!r}")
        k, v = it.split("=", 1)
        if k not in ALIASES:
            raise DatasetError(f"unknown field {k!r}; fields: {', '.join(ALIASES)}")
        out[k] = v
    return out
