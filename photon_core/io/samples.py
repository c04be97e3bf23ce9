"""The bundled sample cases (`sample_cases/` at the top of the repository, or ``$PHOTON_CT_SAMPLES``).

    cases()              # the manifest's entries: id, title, file, label_map, labels, suggested questions
    case("abdomen_ct")   # one entry, by id or title
    path(entry["file"])  # a file of the folder

The app lists them, the demo data generator draws its bodies from them; both read them here.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path


def folder() -> Path:
    """The sample-case folder: ``$PHOTON_CT_SAMPLES`` if set, else the checkout's ``sample_cases/``."""
    env = os.environ.get("PHOTON_CT_SAMPLES")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / "sample_cases"
    if not (d / "cases.json").is_file():
        raise FileNotFoundError(f"No sample cases at {d.name!r} (no cases.json); "
                                f"set PHOTON_CT_SAMPLES to the folder that holds them.")
    return d


def path(relative: str) -> Path:
    return folder() / relative


@lru_cache(maxsize=4)
def _manifest(d: Path) -> dict:
    return json.loads((d / "cases.json").read_text())


def cases() -> list[dict]:
    return _manifest(folder())["cases"]


def case(key: str) -> dict:
    """One case by id or title (spaces around it ignored); ValueError naming the known ids otherwise."""
    key = str(key).strip()
    for c in cases():
        if key in (c["id"], c["title"]):
            return c
    shown = repr(key) if len(key) <= 60 else repr(key[:60]) + "…"
    raise ValueError(f"Unknown sample case {shown}; known: {', '.join(c['id'] for c in cases())}.")
