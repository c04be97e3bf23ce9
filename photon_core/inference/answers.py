"""Is an answer readable for its question? A model's text that does not parse as an answer of the
question's type ("norightno" to a yes/no question, "right" to "which organ…?") is shown as an
*unreadable answer* beside its raw text, never as an answer.

    question_type("Which kidney is larger?")          # 'side'
    readable("Is the spleen enlarged?", "yes")         # True
    readable("Is the spleen enlarged?", "norightno")   # False

Question types, from the question's words (the first rule that applies):

============  =======================================================  ======================================
type          questions                                                a readable answer
============  =======================================================  ======================================
side          "which side…", "…left or (the) right?", "which kidney…"  left / right (or both, bilateral)
choice        "…a cyst or a solid lesion?", "larger, smaller or …?"     names one of the options
yes_no        starts with is/are/does/has/… (no "or" options)          starts with yes or no, not both
count         "how many…", "count…", "number of…"                      a whole number (digits or words)
measurement   "diameter", "how large", "volume", "… in mm", …           a number; with a unit of the asked
                                                                       kind where the question names none
organ         "which/what organ…", "where is…"                         names an organ (`photon_core.organs`,
                                                                       TotalSegmentator's, names given)
open          anything else                                            any words
============  =======================================================  ======================================

Every type also needs an answer without junk: something to read, no control characters or special
tokens, no word glued from answer words ("norightno", "yesno"), no word mixing letters and digits
("82whichno1") other than a number with its unit ("12mm").
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache, lru_cache

from photon_core.organs import ORGANS, PAIRED, TOTALSEG_CLASSES

YES_NO = ("yes", "no")
SIDES = ("left", "right", "both", "bilateral")
SIDE_ANSWERS = SIDES + ("neither", "equal", "same", "symmetric")    # "which kidney is larger?"
NONE_WORDS = ("none", "nowhere", "neither", "normal")        # "which organ…?" when there is none
_AUX = ("is", "are", "was", "were", "does", "do", "did", "has", "have", "had", "can", "could", "will",
        "would", "should", "shall", "may", "might", "must")
_ARTICLES = ("a", "an", "the", "it", "is", "its", "this", "that")
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_LENGTH_UNITS = ("mm", "cm", "m", "millimetre", "millimetres", "millimeter", "millimeters", "centimetre",
                 "centimetres", "centimeter", "centimeters")
_VOLUME_UNITS = ("ml", "cc", "l", "litre", "litres", "liter", "liters", "millilitre", "millilitres",
                 "milliliter", "milliliters", "cm3", "mm3")
_UNITS = _LENGTH_UNITS + _VOLUME_UNITS + ("hu", "%", "percent", "x")      # 'x': '12x8 mm'
_SUFFIXES = ("st", "nd", "rd", "th", "d")                            # '2nd', '3D'
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_TOKEN = re.compile(rf"(?:{_NUMBER})(?:[a-z%]+\d?)?|[a-z]+(?:['-][a-z]+)*|[^\sa-z\d]", re.I)
_GLUE_WORDS = YES_NO + SIDES + ("none", "cyst", "solid", "larger", "smaller", "stable", "new", "resolved")


def _words(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text.replace("_", " "))]


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


@lru_cache(maxsize=1)
def _organ_names() -> tuple[frozenset, ...]:
    """Every organ name as the set of its words, sides left out ('kidney_left' → {'kidney'})."""
    names = list(ORGANS) + list(PAIRED) + list(TOTALSEG_CLASSES.values())
    sets = {frozenset(_stem(w) for w in _words(n) if w not in SIDES) for n in names}
    return tuple(sets - {frozenset()})


@lru_cache(maxsize=1)
def _answer_words() -> frozenset:
    return frozenset(_GLUE_WORDS) | {w for n in _organ_names() for w in n}


def _vocabulary(extra: Iterable[str] = ()) -> set[str]:
    return set(_answer_words()) | {_stem(w) for n in extra for w in _words(n)}


# --------------------------------------------------------------------------------------------
# Question types
# --------------------------------------------------------------------------------------------

def question_type(question: str) -> str:
    """'side' | 'choice' | 'yes_no' | 'count' | 'measurement' | 'organ' | 'open' (table above)."""
    q = " ".join(_words(question))
    paired = "|".join(sorted(set(PAIRED) | {"adrenal", "adrenal gland", "lung lobe", "ovary", "breast"}))
    if (re.search(r"\bwhich side\b|\bon which side\b", q)
            or re.search(r"\b(left|right) or (the )?(left|right)\b", q)
            or re.search(rf"\bwhich ({paired})s?\b", q)):
        return "side"
    existential = re.match(r"(is|are|was|were) there\b", q) or re.search(r"\bany\b", q)
    if not existential and _options(question):
        return "choice"
    first = q.split()[0] if q.split() else ""
    if first in _AUX:
        return "yes_no"
    if re.search(r"\bhow many\b|\bcount\b|\bnumber of\b", q):
        return "count"
    if (re.search(r"\b(diameter|size|length|width|volume|measure|measurement|thickness)\b", q)
            or re.search(r"\bhow (large|big|long|wide|thick|much)\b", q) or _asked_unit(question)):
        return "measurement"
    if re.search(r"\b(which|what) organ|\bwhere\b|\bin which\b|\bwhich (structure|part)\b", q):
        return "organ"
    return "open"


def _options(question: str) -> list[str]:
    """The alternatives of an 'A or B' / 'A, B or C' question, as their key words ([] if none)."""
    q = question.lower().strip().rstrip("?.! ")
    clause = re.split(r"[:;]", q)[-1] if " or " in re.split(r"[:;]", q)[-1] else q
    if " or " not in clause:
        return []
    before, _, after = clause.rpartition(" or ")
    after_words = [w for w in _words(after) if w not in _ARTICLES]
    if not after_words or len(after_words) > 2:          # 'a cyst or a solid lesion', not '… or x in the y'
        return []
    options = [after_words[0]]
    for part in before.split(","):
        words = [w for w in _words(part) if w not in _ARTICLES]
        if words:
            options.append(words[-1])
    return options


def _asked_unit(question: str) -> str | None:
    """'length' or 'volume' when the question names a unit ('in mm', '(ml)')."""
    words = set(_words(question))
    if words & set(_LENGTH_UNITS) - {"m"}:
        return "length"
    if words & set(_VOLUME_UNITS) - {"l"}:
        return "volume"
    return None


# --------------------------------------------------------------------------------------------
# Readable answers
# --------------------------------------------------------------------------------------------

def junk(text: str, names: Iterable[str] = ()) -> bool:
    """True when ``text`` holds nothing to read or reads as garbled (see the module docstring)."""
    if not text or not text.strip() or "\ufffd" in text or re.search(r"<\|?[a-z_]+\|?>|\[unk\]", text, re.I):
        return True
    if any(not ch.isprintable() and ch not in "\n\t" for ch in text):
        return True
    words = _words(text)
    if not any(re.search(r"[a-z\d]", w) for w in words):
        return True
    vocabulary = _vocabulary(names)
    for w in words:
        if re.search(r"\d", w) and re.search(r"[a-z]", w):          # a number with its unit only
            m = re.fullmatch(rf"({_NUMBER})([a-z%]+\d?)", w)
            if not m or not (m.group(2) in _UNITS + _SUFFIXES or re.fullmatch(r"x\d", m.group(2))):   # '12x8
                return True
        elif w.isalpha() and _stem(w) not in vocabulary and _glued(w, vocabulary):
            return True
    return False


def _glued(word: str, vocabulary: set[str]) -> bool:
    """The word splits into two or more answer words ('norightno' = no + right + no)."""
    @cache
    def parts(i: int) -> int | None:             # the fewest vocabulary words covering word[i:], or None
        if i == len(word):
            return 0
        best = None
        for j in range(i + 2, len(word) + 1):
            if word[i:j] in vocabulary:
                rest = parts(j)
                if rest is not None and (best is None or rest + 1 < best):
                    best = rest + 1
        return best

    n = parts(0)
    return n is not None and n >= 2


def _numbers(words: list[str]) -> list[tuple[float, str | None]]:
    """(value, unit or None) of every number in the answer, digits or words ('two')."""
    out = []
    for k, w in enumerate(words):
        m = re.fullmatch(rf"({_NUMBER})([a-z%]+\d?)?", w)
        if m:
            unit = m.group(2) or (words[k + 1] if k + 1 < len(words) and words[k + 1] in _UNITS else None)
            out.append((float(m.group(1).replace(",", "")), unit))
        elif w in _NUMBER_WORDS:
            out.append((float(_NUMBER_WORDS[w]), None))
    return out


def _names_organ(words: list[str], names: Iterable[str]) -> bool:
    have = {_stem(w) for w in words}
    extra = tuple(frozenset(_stem(w) for w in _words(n) if w not in SIDES) for n in names)
    return any(n and n <= have for n in _organ_names() + extra)


def readable(question: str, text: str, names: Iterable[str] = ()) -> bool:
    """Whether ``text`` parses as an answer of ``question``'s type (`question_type`). ``names``: more
    structure names an organ answer may use (e.g. the loaded label map's)."""
    if not isinstance(text, str) or junk(text, names):
        return False
    words = _words(text)
    kind = question_type(question)
    said = [w for w in words if re.search(r"[a-z\d]", w)]
    if kind == "yes_no":
        return said[0] in YES_NO and not ((set(YES_NO) - {said[0]}) & set(said))
    if kind == "side":
        return bool(set(said) & set(SIDE_ANSWERS)) and not set(said) & set(YES_NO)
    if kind == "choice":
        options = {_stem(o)[:4] for o in _options(question)}
        return any(_stem(w)[:4] in options for w in said if len(w) >= 3)
    if kind == "count":
        nums = _numbers(said)
        if not nums:                                  # 'none', 'no lesions' (but not a bare 'no')
            return said[0] == "none" or (said[0] == "no" and len(said) > 1)
        return nums[0][0] == int(nums[0][0])
    if kind == "measurement":
        nums = _numbers(said)
        if not nums:
            return False
        unit = nums[0][1]
        asked = _asked_unit(question)
        if unit is None:
            return asked is not None                  # '12' reads as the unit the question named
        dim = "length" if unit in _LENGTH_UNITS else "volume" if unit in _VOLUME_UNITS else "other"
        return asked is None or dim == asked or dim == "other"
    if kind == "organ":
        return _names_organ(said, names) or said[0] in NONE_WORDS or said[:2] == ["no", "lesion"]
    return True
