"""Names the app uses that other branches add to photon_core, each with a small fallback until they land.

FALLBACKS — delete each one once its branch is merged (and import the name directly where it is used):
* branch ``intake``: `Volume.warnings`, `io.volume.list_series` / `load_volume(..., series=)`,
  `organs.label_names`, `inference.answers.readable` / `Answer.readable`, `model.budget.MIN_KEEP_TOKENS`
  (and `Budget` refusing budgets below it);
* branch ``engine``: `Answer.probability`;
* branch ``official``: `Predictor.checkpoint` (`CheckpointInfo.to_dict()`, ``has_its``),
  `Predictor.supports(budget)`.
Every fallback is the behaviour of main before those branches: nothing here re-implements them.
"""
from __future__ import annotations

import numpy as np

from photon_core.io import volume as _volume
from photon_core.model import budget as _budget

# FALLBACK (intake): the floor below which a keep budget is refused.
MIN_KEEP_TOKENS: int = int(getattr(_budget, "MIN_KEEP_TOKENS", 10))


def check_budget(budget, visual_tokens: int = 1000) -> None:
    """Refuse a manual budget below the floor (FALLBACK (intake): `Budget` itself refuses it there)."""
    if hasattr(_budget, "MIN_KEEP_TOKENS"):
        return
    k = {"top_k": budget.value, "ratio": (budget.value or 0) * visual_tokens}.get(budget.mode)
    if k is not None and k < MIN_KEEP_TOKENS:
        raise ValueError(f"A budget of {k:g} visual tokens is too small to answer from; keep at least "
                         f"{MIN_KEEP_TOKENS} of {visual_tokens}.")


def volume_warnings(vol) -> list[str]:
    """The loader's readable warnings about a volume (FALLBACK (intake): none)."""
    return list(getattr(vol, "warnings", None) or [])


def list_series(files) -> list:
    """The DICOM series among uploaded files, as `SeriesInfo` (FALLBACK (intake): none listed)."""
    fn = getattr(_volume, "list_series", None)
    if fn is None:
        return []
    return list(fn(files))


def load_volume(source, limits, series: str | None = None):
    """`load_volume`, choosing a DICOM series by uid (FALLBACK (intake): the only series there is)."""
    if series:
        return _volume.load_volume(source, limits, series=series)
    return _volume.load_volume(source, limits)


def label_names(label_ids, table_path=None) -> tuple[dict, str | None]:
    """Names of a label map's ids (FALLBACK (intake): numbered, with a note saying so)."""
    from photon_core import organs

    fn = getattr(organs, "label_names", None)
    if fn is not None:
        return fn(label_ids, table_path)
    ids = [int(i) for i in label_ids if int(i)]
    return ({i: f"label_{i}" for i in ids},
            "label names are numbered: this build cannot read a class map or a names table")


def readable(question: str, answer) -> bool:
    """Whether an answer parses for its question type (FALLBACK (intake): every answer counts as read)."""
    flag = getattr(answer, "readable", None)
    if isinstance(flag, bool):
        return flag
    try:
        from photon_core.inference.answers import readable as fn
    except ImportError:
        return True
    return bool(fn(question, answer.text))


def probability(answer) -> float | None:
    """exp(mean token log-prob) of the answer (FALLBACK (engine): unknown)."""
    p = getattr(answer, "probability", None)
    return None if p is None or not np.isfinite(p) else float(p)


def checkpoint(predictor) -> dict:
    """The checkpoint's provenance (FALLBACK (official): the model's name)."""
    info = getattr(predictor, "checkpoint", None)
    if info is not None and hasattr(info, "to_dict"):
        return dict(info.to_dict())
    return {"name": predictor.name}


def has_its(predictor) -> bool:
    """Whether the checkpoint has a learned threshold θ (an S2); S1 has none (FALLBACK (official): yes)."""
    info = getattr(predictor, "checkpoint", None)
    return bool(getattr(info, "has_its", True))


def supports(predictor, budget) -> str | None:
    """Why the checkpoint cannot run a budget, or None (FALLBACK (official): every budget runs)."""
    fn = getattr(predictor, "supports", None)
    return fn(budget) if fn is not None else None
