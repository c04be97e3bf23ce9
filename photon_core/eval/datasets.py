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
import io
import json
import re
from pathlib import Path

from photon_core.model.budget import Budget

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
    "prior_image": ("prior_image", "prior", "prior_volume", "previous_image", "baseline_image",
                    "image_prior"),
    "budget": ("budget",),                 # a record's own keep budget (as photon-ask --budget takes it)
}
_NUMBER = re.compile(r"^\s*[-+]?\d+(\.\d+)?\s*(mm|cm|ml|cc|%|hu)?\s*$", re.I)


class DatasetError(ValueError):
    """A mistake in the data a user gave, said in words with the file and row (the evaluator prints
    it as one line and exits 2, before a model is loaded)."""


def _column(row: dict, field: str, columns: dict) -> str | None:
    """The column of ``row`` that holds ``field``: the ``--columns`` override, else the first alias
    with a value (else the first alias present, so an empty value is told apart from no column)."""
    lower = {str(k).strip().lower(): k for k in row}
    if field in columns:
        key = columns[field].strip().lower()
        if key not in lower:
            raise DatasetError(f"column {columns[field]!r} (for {field}) is not in the data; "
                               f"it has {sorted(lower)}")
        return lower[key]
    present = [lower[a] for a in ALIASES[field] if a in lower]
    return next((k for k in present if row[k] not in (None, "")), present[0] if present else None)


def _pick(row: dict, field: str, columns: dict) -> object:
    key = _column(row, field, columns)
    return None if key is None else row[key]


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


def jsonl_rows(text: str, path) -> list[tuple[int, object]]:
    """Each non-blank line of a JSONL text, parsed, with its line number; a line that is not JSON is a
    DatasetError naming ``path`` and the line (json's own message would say line 1)."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DatasetError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})") from None
    return rows


def _normalise(row: dict, columns: dict, base: Path, family_default: str, where: str) -> dict:
    """One record in the open layout; ``where`` ("file:line") starts every message about it."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a record (an object with image, question and answer "
                           f"fields), got {type(row).__name__}")
    try:
        return _record(row, columns, base, family_default)
    except DatasetError as e:
        raise DatasetError(f"{where}: {e}") from None


def _record(row: dict, columns: dict, base: Path, family_default: str) -> dict:
    keys = {f: _column(row, f, columns) for f in ("image", "question", "answer")}
    missing = [f for f, k in keys.items() if k is None]
    if missing:
        seen = sorted(str(k) for k in row)
        sep = next((c for c in ";\t|" if len(seen) == 1 and c in seen[0]), None)
        if sep:                                          # a CSV saved with another separator
            raise DatasetError(f"the columns seem separated by {sep!r} ({seen[0]!r} reads as one column); "
                               "save the file with commas between columns")
        raise DatasetError(f"no {' or '.join(missing)} column among {seen}; "
                           f"name it with --columns {missing[0]}=COLUMN")
    empty = [f"{f} (column {str(k)!r})" for f, k in keys.items()
             if row[k] is None or str(row[k]).strip() == ""]
    if empty:
        raise DatasetError(f"the {' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty")
    image, question, answer = (row[keys[f]] for f in ("image", "question", "answer"))
    options = _pick(row, "options", columns)
    if row.get("space") == "model":
        atype = row.get("answer_type") or _answer_type(answer, options, None)
    else:
        atype = _answer_type(answer, options, _pick(row, "answer_type", columns))
    resolve = lambda p: str(Path(str(p)) if Path(str(p)).is_absolute() else base / str(p))  # noqa: E731
    family = _pick(row, "family", columns)
    rec = dict(image=resolve(image), question=str(question), answer=str(answer),
               family=str(family) if family not in (None, "") else family_default, answer_type=atype,
               organ=_pick(row, "organ", columns))
    subtype = _pick(row, "subtype", columns)
    if subtype not in (None, ""):
        rec["subtype"] = str(subtype)       # the official evaluators score per subtype (evaluate --protocol)
    prior = _pick(row, "prior_image", columns)
    if prior not in (None, ""):
        rec["prior_image"] = resolve(prior)
    budget = _pick(row, "budget", columns)
    if budget not in (None, ""):            # the record's own keep budget, over --budget
        try:
            Budget.parse(budget)
        except ValueError as e:
            raise DatasetError(f"budget {budget!r}: {e}") from None
        rec["budget"] = str(budget)
    if options:
        rec["question"] += (" Options: "
                            f"{options if isinstance(options, str) else ', '.join(map(str, options))}")
    if row.get("space"):
        rec["space"] = row["space"]
    return rec


def read_text(path: Path) -> str:
    """The file as text: UTF-8, with or without a byte-order mark (Excel writes one); any other
    encoding is named, with the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DatasetError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                           "UTF-8 (e.g. a Latin-1 or Windows-1252 CSV re-saved as \"CSV UTF-8\")") from None


def read_records(path: Path, columns: dict | None = None, images: Path | None = None) -> list[dict]:
    """Records from our JSONL, a CSV (or folder of CSVs) or a JSON list; images resolved against
    ``images`` (default: the data file's folder). Every mistake is a `DatasetError` naming the file
    and the line (CSV, JSONL) or record (JSON) it is in."""
    path = Path(path)
    columns = columns or {}
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.rglob("*.csv"))
        if not files:
            raise DatasetError(f"{path}: the folder holds no .csv files")
        return [r for f in files for r in read_records(f, columns, images or path)]
    base = Path(images) if images else path.parent
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl", ".json"):     # before reading: a scan is not text
        raise DatasetError(f"{path}: expected a .jsonl, .json or .csv file (or a folder of .csv files) "
                           "of questions; scans are named in its records' image field")
    text = read_text(path)
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        out = []
        for row in reader:                     # line_num: the line the row ends on (quoted newlines)
            out.append(_normalise(row, columns, base, path.stem, f"{path}:{reader.line_num}"))
        return out
    if suffix == ".jsonl":
        return [_normalise(row, columns, base, path.stem, f"{path}:{n}") for n, row in jsonl_rows(text, path)]
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}:{e.lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):
        data = next((data[k] for k in ("data", "questions", "annotations", "items")
                     if isinstance(data.get(k), list)), None)
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON list of records "
                           "(or one under 'data'/'questions'/'annotations'/'items')")
    return [_normalise(r, columns, base, path.stem, f"{path}: record {i}") for i, r in enumerate(data, 1)]


def parse_columns(items: list[str]) -> dict:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if not v.strip():
            raise DatasetError(f"--columns takes field=COLUMN pairs, got {it!r}")
        if k not in ALIASES:
            raise DatasetError(f"--columns: unknown field {k!r}; fields: {', '.join(ALIASES)}")
        out[k] = v
    return out
