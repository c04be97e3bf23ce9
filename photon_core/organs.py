"""Anatomy in one place: organ names ↔ label ids, the organs a question names, block coverage.

* `ORGANS` — the organs questions talk about, by name, with their TotalSegmentator ("total" task) label ids;
  `PAIRED` / `MIRROR` — the sided pairs.
* `organs_in_question` — which of a list of label names a question asks about ('left kidney' →
  kidney_left; 'kidney' with no side → both; 'lungs' → every lobe); label names in German, French, Spanish
  or Italian are read in English ('Niere links' → left kidney).
* Block coverage — a token block (14 slices × 28 × 28 pixels of the model volume) counts for a structure
  when at least `BLOCK_FRACTION` of its voxels belong to it (the paper's retention analysis). A structure
  smaller than that everywhere (a 1 ml lesion in a 36 mm block) would vanish from the audit: it then counts
  by any overlap instead, and the caller is told (`label_blocks` returns which structures fell back).
* `label_names` — names for the ids of an uploaded label map: from the user's table (JSON or CSV), else
  TotalSegmentator's "total" classes (`TOTALSEG_CLASSES`, totalsegmentator_total.json) when the ids
  fit them, else numbered; with a note for the user whenever the names are not the user's own.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import re
import shlex
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import numpy as np

ORGANS = {
    "liver": [5], "spleen": [1], "left kidney": [3], "right kidney": [2], "stomach": [6],
    "pancreas": [7], "gallbladder": [4], "urinary bladder": [21], "left lung": [10, 11],
    "right lung": [12, 13, 14], "aorta": [52],
}
PAIRED = {"kidney": ("left kidney", "right kidney"), "lung": ("left lung", "right lung")}
MIRROR = {"left kidney": "right kidney", "right kidney": "left kidney", "left lung": "right lung",
          "right lung": "left lung"}
BLOCK_FRACTION = 0.25
N_BLOCKS = 1000                      # 10 × 10 × 10 visual tokens of the official geometry
_SIDES = ("left", "right")


# How radiologists name what the label maps call otherwise: the adjective ('renal cyst'), a part ('the
# pancreatic head'), two words for one ('gall bladder'), a level ('L4'), an ordinal ('the 12th rib').
_TERMS = [
    (r"\bgall ?bladders?\b", "gallbladder"), (r"\bpancreatic\b", "pancreas"), (r"\bhepatic\b", "liver"),
    (r"\brenal\b", "kidney"), (r"\bsplenic\b", "spleen"), (r"\bgastric\b", "stomach"),
    (r"\bpulmonary\b", "lung"), (r"\baortic\b", "aorta"), (r"\bcolonic\b", "colon"),
    (r"\bduodenal\b", "duodenum"), (r"\b(o?esophageal|oesophagus)\b", "esophagus"),
    (r"\badrenals?\b", "adrenal gland"), (r"\bthyroid\b", "thyroid gland"),
    (r"(?<!gall)(?<!gall )\bbladder\b", "urinary bladder"),
    (r"\b([ctls])([1-9]|1[0-2])\b", r"vertebrae \1\2"), (r"\b(\d{1,2})(?:st|nd|rd|th) ribs?\b", r"rib \1"),
]


def _with_terms(question: str) -> str:
    """The question, lower case, with the label maps' words for the radiologist's terms it uses added."""
    q = question.lower()
    extra = [m.expand(term) for pattern, term in _TERMS for m in re.finditer(pattern, q)]
    return " ".join([q, *extra])


def _name_words(name: str) -> list[str]:
    """A label name's words, lower case, in English: punctuation ('kidney-left', 'Liver.') and an
    abbreviation in brackets ('Inferior vena cava (IVC)', as the FLARE tables write) are not words of the
    structure; a German, French, Spanish or Italian name is read in the English words questions use
    (`_in_english`: 'Niere links' → kidney left, 'Lóbulo superior del pulmón derecho' → lobe upper lung
    right). Read once a name (`_words_of`): every ask and view reads the same few hundred names again."""
    return list(_words_of(name))


@functools.lru_cache(maxsize=4096)
def _words_of(name: str) -> tuple[str, ...]:
    text = name.lower()
    bare = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", text)
    return tuple(_in_english(re.sub(r"[\W_]+", " ", bare if bare.strip() else text).split()))


# Label names as local segmentation tools and PACS export them in German, French, Spanish and Italian
# (keys without accents, see `_plain`): the English words of the same structure, side or part. Only label
# names are read this way, never a question (English: "rate" is the French spleen). English words of
# TotalSegmentator's classes are not keys (a test checks that its names read as before).
_PHRASES = {
    "vesicule biliaire": "gallbladder", "vesicula biliar": "gallbladder",
    "intestin grele": "small bowel", "intestino delgado": "small bowel", "intestino tenue": "small bowel",
    "vena cava inferior": "inferior vena cava", "veine cave inferieure": "inferior vena cava",
    "vena cava inferiore": "inferior vena cava", "untere hohlvene": "inferior vena cava",
    "vena cava superior": "superior vena cava", "veine cave superieure": "superior vena cava",
    "vena cava superiore": "superior vena cava", "obere hohlvene": "superior vena cava",
    "glande surrenale": "adrenal gland", "glandula suprarrenal": "adrenal gland",
    "ghiandola surrenale": "adrenal gland", "glande thyroide": "thyroid gland",
    "glandula tiroides": "thyroid gland", "ghiandola tiroidea": "thyroid gland",
    "vessie urinaire": "urinary bladder", "vejiga urinaria": "urinary bladder",
    "vescica urinaria": "urinary bladder",
}
_PHRASE_RE = re.compile(r"\b(?:" + "|".join(map(re.escape, _PHRASES)) + r")\b")
_WORDS = {
    "liver": ("leber", "foie", "higado", "fegato"),
    "spleen": ("milz", "rate", "bazo", "milza"),
    "kidney": ("niere", "nieren", "rein", "reins", "rinon", "rinones", "rene", "reni"),
    "pancreas": ("pankreas", "bauchspeicheldruse", "bauchspeicheldruese"),
    "stomach": ("magen", "estomac", "estomago", "stomaco"),
    "gallbladder": ("gallenblase", "colecisti", "cistifellea"),
    "urinary bladder": ("harnblase", "blase", "vessie", "vejiga", "vescica"),
    "lung": ("lunge", "lungen", "poumon", "poumons", "pulmon", "pulmones", "polmone", "polmoni"),
    "aorta": ("aorte",),
    "adrenal gland": ("nebenniere", "nebennieren", "surrenale", "suprarrenal"),
    "esophagus": ("speiserohre", "speiseroehre", "osophagus", "oesophagus", "oesophage", "esofago"),
    "duodenum": ("zwolffingerdarm", "zwoelffingerdarm", "duodeno"),
    "colon": ("kolon", "dickdarm"),
    "small bowel": ("dunndarm", "duenndarm"),
    "heart": ("herz", "coeur", "corazon", "cuore"),
    "thyroid gland": ("schilddruse", "schilddruese", "thyroide", "tiroides", "tiroide"),
    "prostate": ("prostata",),
    "trachea": ("luftrohre", "luftroehre", "trachee", "traquea"),
    "vertebrae": ("wirbel", "wirbelkorper", "wirbelkoerper", "vertebre", "vertebra", "vertebras"),
    "sacrum": ("kreuzbein", "sacro"),
    "rib": ("rippe", "cote", "costilla", "costola"),
    "left": ("links", "linke", "linker", "linkes", "gauche", "izquierdo", "izquierda", "sinistro",
             "sinistra"),
    "right": ("rechts", "rechte", "rechter", "rechtes", "droit", "droite", "derecho", "derecha", "destro",
              "destra"),
    "head": ("kopf", "tete", "cabeza", "testa"),
    "tail": ("schwanz", "queue", "cola", "coda"),
    "body": ("korper", "koerper", "corps", "cuerpo", "corpo"),
    "lobe": ("lappen", "lobulo", "lobo"),
    "upper lobe": ("oberlappen",), "lower lobe": ("unterlappen",), "middle lobe": ("mittellappen",),
    "lung upper lobe": ("lungenoberlappen",), "lung lower lobe": ("lungenunterlappen",),
    "lung middle lobe": ("lungenmittellappen",), "pancreas head": ("pankreaskopf",),
    "pancreas body": ("pankreaskorper", "pankreaskoerper"), "pancreas tail": ("pankreasschwanz",),
}
_FOREIGN = {w: english.split() for english, words in _WORDS.items() for w in words}
_FOREIGN_FILLER = {"der", "die", "das", "des", "du", "de", "la", "le", "les", "del", "della", "dello", "di",
                   "el", "und", "et", "y", "e", "osso", "hueso"}
# a lobe's level: 'superior' is also English, and stays itself elsewhere ('superior vena cava')
_LOBE_LEVEL = {"superior": "upper", "superieur": "upper", "superiore": "upper", "ober": "upper",
               "inferior": "lower", "inferieur": "lower", "inferiore": "lower", "unter": "lower",
               "moyen": "middle", "medio": "middle", "mittel": "middle"}


def _plain(word: str) -> str:
    """A word without accents ('pulmón' → pulmon, 'cœur' → coeur, 'Speiseröhre' → speiserohre)."""
    word = word.replace("œ", "oe").replace("ß", "ss")
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))


# vertebral levels as German reports and tools write them: LWK 4 (Lendenwirbelkörper), BWK 12 or Th12
# (Brustwirbel), HWK 2 (Halswirbel), SWK 1 (Sakralwirbel) → TotalSegmentator's vertebrae_L4 / _T12 / …
_LEVEL_RE = re.compile(r"\b(hwk|bwk|th|lwk|swk) ?([1-9]|1[0-2])\b")
_LEVEL = {"hwk": "c", "bwk": "t", "th": "t", "lwk": "l", "swk": "s"}


def _in_english(words: list[str]) -> list[str]:
    """A label name's words with those of another language (`_FOREIGN`, `_PHRASES`, a German vertebral
    level) in English; a name with none is returned as it is."""
    text, phrases = _PHRASE_RE.subn(lambda m: _PHRASES[m.group(0)], " ".join(_plain(w) for w in words))
    text, levels = _LEVEL_RE.subn(lambda m: f"vertebrae {_LEVEL[m.group(1)]}{m.group(2)}", text)
    if not phrases and not levels and not any(w in _FOREIGN for w in text.split()):
        return words                                            # nothing foreign: the name as it was
    out = [e for w in text.split() if w not in _FOREIGN_FILLER for e in _FOREIGN.get(w, [w])]
    if "lobe" in out:
        out = [_LOBE_LEVEL.get(w, w) for w in out]
    return out


# Words that name a part of a structure ('pancreas head', 'Head of pancreas', 'liver segment 8',
# 'lung_upper_lobe_left', 'stomach, body'): such a name answers to a question about the whole structure too.
_PART_WORDS = {"head", "neck", "body", "tail", "uncinate", "process", "lobe", "upper", "lower", "middle",
               "segment", "dome", "fundus", "antrum", "pylorus", "cardia", "cortex", "pole", "isthmus"}
_FILLER = {"of", "the"}


def _phrase_in(words: list[str], q: str) -> bool:
    return bool(words) and re.search(rf"\b{re.escape(' '.join(words))}s?\b", q) is not None


def organs_in_question(question: str, names: list[str]) -> list[str]:
    """The names (organ names or label names such as 'kidney_left', 'lung_upper_lobe_right') that the
    question talks about. A name matches when its words other than left/right appear in the question
    (plural allowed; radiologists' terms count, see ``_TERMS``: 'renal' for kidney, 'L4' for vertebrae_L4)
    and, if the name has a side, the question names that side or no side at all. A name of a part of a
    structure (``_PART_WORDS``: 'pancreas head', 'lung upper lobe') matches a question naming the whole
    structure, unless the question names one of its parts ('the pancreatic head'): then that part only."""
    q = _with_terms(question)
    asks_side = re.search(r"\b(left|right)\b", q) is not None
    q_words = set(re.findall(r"\w+", q))
    found = []                                   # (name, the structure it is a part of or None, whole match)
    for n in names:
        parts = _words_of(n)
        side = next((s for s in _SIDES if s in parts), None)
        if side is not None and side not in q and asks_side:
            continue
        rest = [p for p in parts if p not in _SIDES]
        part = [p for p in rest if p in _PART_WORDS]
        core = [p for p in rest if p not in _PART_WORDS and p not in _FILLER and not (part and p.isdigit())]
        whole = core if part else None           # the structure this names a part of
        named = set(rest) - _FILLER
        if _phrase_in(rest, q) or (whole and _phrase_in(whole, q) and named <= q_words):
            found.append((n, tuple(whole or ()), True))
        elif whole and _phrase_in(whole, q):
            found.append((n, tuple(whole), False))
    named_parts = {w for _, w, exact in found if exact and w}
    return [n for n, w, exact in found if exact or w not in named_parts]


def label_blocks(token_index, labels: np.ndarray, names: dict,
                 fraction: float = BLOCK_FRACTION, n_blocks: int = N_BLOCKS) -> tuple[dict, list[str]]:
    """Per structure of a label map on the scan's grid: its token blocks, bool (n_blocks,).

    token_index (I, J, K): flat token of each original voxel (−1 outside the model volume), an array or
    an `io.preprocess.TokenMap`; labels: the label map on the same grid; names {label id: name}. A block
    counts where ≥ ``fraction`` of its voxels are the structure; a structure that reaches that in no block
    counts by any overlap. Returns (blocks by name, the names that fell back to any overlap)."""
    counts = _label_block_counts(token_index, labels, [int(k) for k in names], n_blocks)
    per_block = np.maximum(sum(counts.values()), 1).astype(np.float64)
    out, small = {}, []
    for lid, name in names.items():
        hits = counts.get(int(lid))
        if hits is None or not hits.any():
            continue
        blocks = hits >= fraction * per_block
        if not blocks.any():          # smaller than a block's share everywhere: any overlap counts
            blocks = hits > 0
            small.append(name)
        out[name] = blocks
    return out, small


def label_counts(labels: np.ndarray, chunk: int = 1 << 23) -> tuple[np.ndarray, np.ndarray]:
    """The ids a label map holds, sorted, and their voxel counts: ``np.unique(labels, return_counts=True)``,
    which sorts a copy of the whole map (1.4 s for 512 × 512 × 300); an 8- or 16-bit map's are counted a
    chunk at a time instead."""
    if labels.dtype not in (np.int16, np.uint8, np.int8):
        return np.unique(labels, return_counts=True)
    flat = labels.ravel(order="K")
    offset = -int(np.iinfo(labels.dtype).min)   # 0 for uint8: its values are the bins
    counts = np.zeros(1 << (8 * labels.dtype.itemsize), np.int64)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        counts += np.bincount(part.astype(np.int32) + offset if offset else part, minlength=counts.size)
    held = np.flatnonzero(counts)
    return (held - offset).astype(labels.dtype), counts[held]


def _label_block_counts(token_index, labels: np.ndarray, ids: list[int], n_blocks: int,
                        chunk: int = 1 << 23) -> dict:
    """{label id: its voxels in each token block} for the ids present, and under None those of every
    other label (background included), in one pass over the label map in its memory order, slab by slab
    along its slowest axis, each slab's tokens read for it (``token_index``: an array or an
    `io.preprocess.TokenMap`, indexed with slices; neither the whole token volume nor a copy of it in the
    map's order is made). (Masking both arrays and counting once per label took 6.9 s for 61 structures of
    a 512 × 512 × 300 map.)"""
    order = "F" if labels.flags.f_contiguous and not labels.flags.c_contiguous else "C"
    slow = labels.ndim - 1 if order == "F" else 0
    lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    wanted = sorted({i for i in ids if lo <= i <= hi})
    row = np.full(hi - lo + 1, len(wanted), np.int32)          # a label no id names: the last row
    row[np.asarray(wanted, np.int64) - lo] = np.arange(len(wanted), dtype=np.int32)
    width = n_blocks + 1                                        # the last column: outside the model volume
    counts = np.zeros((len(wanted) + 1) * width, np.int64)
    n = labels.shape[slow] if labels.size else 0
    step = max(1, chunk // max(1, labels.size // max(n, 1)))
    for a in range(0, n, step):
        slab = tuple(slice(a, a + step) if d == slow else slice(None) for d in range(labels.ndim))
        lab = labels[slab].ravel(order=order)                   # a view of a contiguous map
        tok = np.asarray(token_index[slab]).ravel(order=order)
        rows = row[lab.astype(np.int32) - lo]
        cols = tok.astype(np.int32) % width                     # token −1 → the last column
        counts += np.bincount(rows * width + cols, minlength=counts.size)
    counts = counts.reshape(len(wanted) + 1, width)[:, :n_blocks]
    return {**{i: counts[r] for r, i in enumerate(wanted)}, None: counts[-1]}


def block_cover(share, fraction: float = BLOCK_FRACTION, small: bool = True):
    """Blocks a structure covers, from its per-block voxel share (any array type): share ≥ ``fraction``;
    where no block reaches it, any overlap (``small``, the audit's rule) or none (``small=False``: the
    paper's retention analysis, which the evaluator's coverage figures follow)."""
    cover = share >= fraction
    return cover if bool(cover.any()) or not small else share > 0


# --------------------------------------------------------------------------------------------
# Names of an uploaded label map
# --------------------------------------------------------------------------------------------

_TOTALSEG = json.loads((Path(__file__).resolve().parent / "totalsegmentator_total.json").read_text())
TOTALSEG_CLASSES: dict[int, str] = {int(k): v for k, v in _TOTALSEG["classes"].items()}   # 117 classes
TOTALSEG_MIN_LABELS = 3    # fewer ids (a mask: 1 = lesion) are more often a user's own than TotalSeg's
MAX_TABLE_BYTES = 1_000_000
MAX_NAME_CHARS = 64
_BACKGROUND = {"background", "bg", "none", "clear label", "unlabeled", "unlabelled", "0", ""}


def numbered(label_id: int) -> str:
    return f"label_{int(label_id)}"


def label_names(label_ids: Iterable[int],
                table_path: str | Path | None = None) -> tuple[dict[int, str], str | None]:
    """Names for the non-zero ids of a label map, and a note for the user (None when the names are the
    user's own and complete).

    With ``table_path`` (JSON or CSV, see `read_label_table`): the table's names; ids it lacks are
    numbered and the note says which. Without: TotalSegmentator's "total" class names when every id is
    one of its 117 classes and there are at least `TOTALSEG_MIN_LABELS` ids (a note says the names are
    assumed), else numbered (``label_5``) with a note saying so. Raises ValueError (readable) for a
    table that cannot be read."""
    ids = sorted({int(i) for i in label_ids if int(i) != 0})
    if table_path is not None:
        table = read_label_table(table_path)
        names = _unique({i: table.get(i, numbered(i)) for i in ids})
        missing = [i for i in ids if i not in table]
        note = None
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", …" if len(missing) > 10 else "")
            note = (f"{len(missing)} label id{'s' * (len(missing) != 1)} of the label map "
                    f"{'are' if len(missing) != 1 else 'is'} not in '{Path(table_path).name}' ({shown}); "
                    f"shown as numbers.")
        return names, note
    if ids and len(ids) >= TOTALSEG_MIN_LABELS and all(i in TOTALSEG_CLASSES for i in ids):
        return ({i: TOTALSEG_CLASSES[i] for i in ids},
                "Label names assumed from TotalSegmentator's 'total' classes (its ids fit them); upload a "
                "names table (JSON or CSV) if this label map comes from another tool.")
    if not ids:
        return {}, None
    few = len(ids) < TOTALSEG_MIN_LABELS and all(i in TOTALSEG_CLASSES for i in ids)
    why = "too few to be a TotalSegmentator map" if few else "its ids are not TotalSegmentator's classes"
    return ({i: numbered(i) for i in ids},
            f"The label map's {len(ids)} label{'s' * (len(ids) != 1)} {'are' if len(ids) != 1 else 'is'} "
            f"shown as numbers ({', '.join(numbered(i) for i in ids[:3])}{', …' * (len(ids) > 3)}): {why}. "
            f"Upload a names table to name them: JSON {{\"{ids[0]}\": \"tumour\"}} or CSV rows 'id,name'.")


def _unique(names: dict[int, str]) -> dict[int, str]:
    """Two ids with one name would merge in every per-structure table: the later ones get their id."""
    seen: dict[str, int] = {}
    out = {}
    for i, n in names.items():
        out[i] = n if n.lower() not in seen else f"{n} ({i})"
        seen.setdefault(n.lower(), i)
    return out


def read_label_table(path: str | Path) -> dict[int, str]:
    """{id: name} from a user's table. Accepted:

    * JSON: {"5": "liver", ...} (id → name); {"liver": 5, ...} (name → id, as nnU-Net's dataset.json
      "labels"; also inside {"labels": {...}}); a list of {"id": 5, "name": "liver"} objects or [5, "liver"]
      pairs; a list of names whose position is the id, starting with the background ("background", ...).
    * CSV/TSV/text: one 'id,name' row per label (comma, semicolon, tab or spaces; a header row and '#'
      comments are skipped; 3D Slicer colour tables and ITK-SNAP label files read too: the first field is
      the id, the name is the quoted field or else the second).
    Id 0 (background) is dropped. Raises ValueError with a readable message."""
    path = Path(path)
    what = f"The names table '{path.name}'"
    try:
        size = path.stat().st_size
    except OSError:
        raise ValueError(f"{what} could not be opened.") from None
    if size > MAX_TABLE_BYTES:
        raise ValueError(f"{what} is {size / 1e6:.1f} MB; a names table is at most "
                         f"{MAX_TABLE_BYTES // 1000} kB.")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text; save it as a UTF-8 JSON or CSV file.") from None
    if not text.strip():
        raise ValueError(f"{what} is empty.")
    if path.suffix.lower() == ".json" or text.lstrip()[:1] in "{[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} is not valid JSON (line {e.lineno}: {e.msg}).") from None
        pairs = _json_pairs(data, what)
    else:
        pairs = _text_pairs(text, what)
    table: dict[int, str] = {}
    for raw_id, raw_name in pairs:
        i, name = _label_id(raw_id, what), _label_name(raw_name, raw_id, what)
        if i == 0:
            continue
        if i in table and table[i] != name:
            raise ValueError(f"{what} names id {i} twice ('{table[i]}' and '{name}').")
        table[i] = name
    if not table:
        raise ValueError(f"{what} names no label (only the background, id 0).")
    return table


def _json_pairs(data, what: str) -> list[tuple]:
    if isinstance(data, dict) and isinstance(data.get("labels"), (dict, list)):
        data = data["labels"]
    if isinstance(data, dict):
        keys_are_ids = all(re.fullmatch(r"\s*\d+\s*", str(k)) for k in data)
        if keys_are_ids:
            return list(data.items())
        if all(isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()) for v in data.values()):
            return [(v, k) for k, v in data.items()]                   # nnU-Net: name → id
        raise ValueError(f"{what} must map ids to names, e.g. {{\"1\": \"spleen\", \"5\": \"liver\"}}.")
    if isinstance(data, list):
        if all(isinstance(x, dict) for x in data):
            if not all("id" in x and "name" in x for x in data):
                raise ValueError(f"{what}: each entry of the list needs an \"id\" and a \"name\".")
            return [(x["id"], x["name"]) for x in data]
        if all(isinstance(x, (list, tuple)) and len(x) == 2 for x in data):
            return [tuple(x) for x in data]
        if all(isinstance(x, str) for x in data):
            if data and data[0].strip().lower() not in _BACKGROUND:
                raise ValueError(f"{what} is a list of names, so its first entry ('{_short(data[0])}') would "
                                 f"be id 0, the background; start the list with \"background\", or write "
                                 f"{{\"1\": \"{_short(data[0])}\"}}.")
            return list(enumerate(data))
    raise ValueError(f"{what} must map ids to names, e.g. {{\"1\": \"spleen\", \"5\": \"liver\"}}, or list "
                     f"{{\"id\": 5, \"name\": \"liver\"}} entries.")


def _text_pairs(text: str, what: str) -> list[tuple]:
    pairs, header_allowed = [], True
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        delimiter = next((d for d in "\t;," if d in line), None)
        try:
            fields = (next(csv.reader(io.StringIO(line), delimiter=delimiter)) if delimiter
                      else shlex.split(line))
        except (ValueError, csv.Error):
            fields = []
        fields = [f.strip() for f in fields]
        first_row, header_allowed = header_allowed, False
        if not fields or not fields[0].isdigit():
            if first_row and fields and not fields[0][:1].isdigit():
                continue                                            # a header row such as 'id,name'
            raise ValueError(f"{what}, line {n}: expected 'id,name' (an id number, then the name), got "
                             f"'{_short(line)}'.")
        quoted = re.search(r'"([^"]*)"', line)                   # ITK-SNAP: the name is the quoted field
        name = quoted.group(1) if quoted and not delimiter else (fields[1] if len(fields) > 1 else "")
        pairs.append((fields[0], name))
    return pairs


def _short(text, limit: int = 40) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _label_id(raw, what: str) -> int:
    is_id = isinstance(raw, int) or (isinstance(raw, str) and raw.strip().isdigit())
    if isinstance(raw, bool) or not is_id:
        raise ValueError(f"{what}: '{_short(raw)}' is not a label id (a whole number from 0).")
    i = int(raw)
    if i > np.iinfo(np.int16).max:
        raise ValueError(f"{what}: id {i} is too large (label ids go up to {np.iinfo(np.int16).max}).")
    return i


def _label_name(raw, raw_id, what: str) -> str:
    if not isinstance(raw, str):
        raise ValueError(f"{what}: the name of id {raw_id} is not text.")
    name = " ".join("".join(ch if ch.isprintable() else " " for ch in raw).split())
    if not name:
        raise ValueError(f"{what}: id {raw_id} has an empty name.")
    if len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{what}: the name of id {raw_id} is {len(name)} characters long; the limit is "
                         f"{MAX_NAME_CHARS}.")
    return name
