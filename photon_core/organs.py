"""Anatomy in one place: organ names ↔ label ids, the organs a question names, block coverage.

* `ORGANS` — the organs questions talk about, by name, with their TotalSegmentator ("total" task) label ids;
  `PAIRED` / `MIRROR` — the sided pairs.
* `organs_in_question` — which of a list of label names a question asks about ('left kidney' →
  kidney_left; 'kidney' with no side → both; 'lungs' → every lobe).
* Block coverage — a token block (14 slices × 28 × 28 pixels of the model volume) counts for a structure
  when at least `BLOCK_FRACTION` of its voxels belong to it (the paper's retention analysis). A structure
  smaller than that everywhere (a 1 ml lesion in a 36 mm block) would vanish from the audit: it then counts
  by any overlap instead, and the caller is told (`label_blocks` returns which structures fell back).
"""
from __future__ import annotations

import re

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


def organs_in_question(question: str, names: list[str]) -> list[str]:
    """The names (organ names or label names such as 'kidney_left', 'lung_upper_lobe_right') that the
    question talks about. A name matches when its words other than left/right appear in the question
    (plural allowed) and, if the name has a side, the question names that side or no side at all."""
    q = question.lower()
    asks_side = re.search(r"\b(left|right)\b", q) is not None
    found = []
    for n in names:
        parts = n.lower().replace("_", " ").split()
        side = next((s for s in _SIDES if s in parts), None)
        rest = [p for p in parts if p not in _SIDES]
        base = " ".join(rest)
        # TotalSegmentator lobes ('lung upper lobe') answer to 'lung'; other multi-word names need all words
        if rest[:1] == ["lung"]:
            base = "lung"
        if base and re.search(rf"\b{re.escape(base)}s?\b", q):
            if side is None or side in q or not asks_side:
                found.append(n)
    return found


def label_blocks(token_index: np.ndarray, labels: np.ndarray, names: dict,
                 fraction: float = BLOCK_FRACTION, n_blocks: int = N_BLOCKS) -> tuple[dict, list[str]]:
    """Per structure of a label map on the scan's grid: its token blocks, bool (n_blocks,).

    token_index (I, J, K): flat token of each original voxel (−1 outside the model volume); labels: the
    label map on the same grid; names {label id: name}. A block counts where ≥ ``fraction`` of its voxels
    are the structure; a structure that reaches that in no block counts by any overlap. Returns
    (blocks by name, the names that fell back to any overlap)."""
    valid = token_index >= 0
    tok = token_index[valid]
    lab = labels[valid]
    per_block = np.maximum(np.bincount(tok, minlength=n_blocks), 1).astype(np.float64)
    out, small = {}, []
    for lid, name in names.items():
        hits = np.bincount(tok[lab == int(lid)], minlength=n_blocks)
        if not hits.any():
            continue
        blocks = hits >= fraction * per_block
        if not blocks.any():
            blocks, _ = hits > 0, small.append(name)
        out[name] = blocks
    return out, small


def block_cover(share, fraction: float = BLOCK_FRACTION):
    """Blocks a structure covers, from its per-block voxel share (any array type): share ≥ ``fraction``,
    or any overlap where no block reaches it."""
    cover = share >= fraction
    return cover if bool(cover.any()) else share > 0
