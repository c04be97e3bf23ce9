"""The retention audit: what the model kept, on the ORIGINAL scan, per organ, and as files.

* `kept_mask_original` — the kept token blocks as a mask on the original voxel grid (Geometry).
* `kept_outside` — kept tokens that lie wholly in the padding around a scan smaller than the model's field.
  `covered_tokens` — the tokens that cover some voxel of a scan (worked out once per scan).
* `organ_retention` — per organ, the share of its token blocks that were kept (which blocks count for
  an organ: `photon_core.organs.label_blocks`).
* `export_audit` — NIfTI mask (opens over the scan in 3D Slicer), JSON report, and given PNGs.
Nothing here writes a patient identifier or an original file path (the case title goes
through `clean_text`, which keeps its words and drops any absolute path).
"""
from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import numpy as np

from photon_core.io.preprocess import Geometry
from photon_core.io.volume import clean_text
from photon_core.model.budget import SCAN_TOKENS


def kept_mask_original(token_index: np.ndarray, keep_flat: np.ndarray) -> np.ndarray:
    """token_index: (I, J, K) flat token per original voxel (−1 outside); keep_flat (1000,) → uint8 mask."""
    keep_flat = np.asarray(keep_flat, bool).ravel()
    lut = np.concatenate([keep_flat, [False]])          # index −1 → False
    return lut[token_index].astype(np.uint8)


def covered_tokens(token_index: np.ndarray, n: int = SCAN_TOKENS) -> np.ndarray:
    """(n,) bool: the tokens that cover some voxel of the scan (a property of the scan: worked out once)."""
    covered = np.zeros(n + 1, bool)
    covered[token_index] = True                         # index −1 (outside) lands on the extra slot
    return covered[:-1]


def kept_outside(covered: np.ndarray, keep_flat: np.ndarray) -> int:
    """Kept tokens that cover no voxel of the scan (wholly in the padding around a scan smaller than the
    model's field); ``covered``: `covered_tokens` of the scan."""
    return int((np.asarray(keep_flat, bool).ravel() & ~covered).sum())


def organ_retention(blocks: dict[str, np.ndarray], keep_flat: np.ndarray) -> dict[str, float]:
    keep = np.asarray(keep_flat, bool).ravel()
    return {n: float(keep[b].mean()) for n, b in blocks.items()}


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def pairwise_jaccard(sets: list) -> list[float]:
    """Jaccard of every distinct pair of kept sets (e.g. two organ prompts on the same scan)."""
    return [jaccard(sets[i], sets[j]) for i in range(len(sets)) for j in range(i + 1, len(sets))]


def export_audit(folder: Path, geometry: Geometry, token_index: np.ndarray, answer, question: str,
                 model_name: str, retention: dict | None = None, pngs: dict[str, bytes] | None = None,
                 case_title: str = "scan", findings: dict | None = None) -> list[Path]:
    """Write kept_blocks.nii.gz (uint8 on the original grid), report.json and PNG views; return paths.
    ``findings``: what the app showed beside the answer (its probability, the asked structures and their
    retention warning, the loader's warnings, the budget in words and where it cut ρ), into the report."""
    import nibabel as nib
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keep = np.asarray(answer.keep_grid, bool).ravel()
    mask = kept_mask_original(token_index, keep)
    img = nib.Nifti1Image(mask, geometry.orig_affine)
    x = geometry.nifti_xforms
    if x:       # the scan's own qform and sform, with their codes: viewers put the mask where the scan is
        img.set_qform(None if x["qform"] is None else np.asarray(x["qform"]), code=x["qform_code"])
        img.set_sform(None if x["sform"] is None else np.asarray(x["sform"]), code=x["sform_code"])
    img.set_data_dtype(np.uint8)
    img.header["descrip"] = b"Photon kept token blocks (1 = kept)"
    paths = [folder / "kept_blocks.nii.gz"]
    nib.save(img, str(paths[0]))
    import photon_core

    report = {
        "case": clean_text(case_title, 80) or "scan",     # readable ('Abdomen/pelvis CT'), no paths
        "question": question, "answer": answer.text, "budget": answer.budget,
        "answer_readable": bool(getattr(answer, "readable", True)),   # False: not an answer of the
                                                                      # question's type
        "visual_tokens_total": answer.total, "visual_tokens_kept": answer.kept,
        "keep_fraction": round(answer.keep_fraction, 4),
        "theta": round(float(answer.theta), 4) if np.isfinite(answer.theta) else None,   # None: an S1
                                                                                         # checkpoint
        "kept_token_indices": answer.kept_indices, "per_organ_retention": retention or {},
        "latency_s": {"prefill": round(answer.prefill_s, 4), "decode": round(answer.decode_s, 4)},
        "model": model_name, "checkpoint": getattr(answer, "checkpoint", None) or None,
        "device": answer.device,
        "mask_file": "kept_blocks.nii.gz (uint8, original scan grid, 1 = voxel inside a kept token block)",
        # blocks of the model's field that lie wholly in the padding around a scan smaller than it: kept or
        # not, the mask cannot show them
        "kept_tokens_outside_scan": kept_outside(covered_tokens(token_index, keep.size), keep),
        "versions": {"photon_ct": getattr(photon_core, "__version__", "0"), "torch": torch.__version__,
                     "nibabel": nib.__version__, "python": platform.python_version()},
        "token_grid": "10x10x10 over the (140, 280, 280) model volume; index = a*100 + b*10 + c",
    }
    report.update(findings or {})
    if answer.prior_total:     # asked with a prior scan: the counts above hold both, the mask the current
        report["prior_scan"] = {**report.get("prior_scan", {}), "visual_tokens_total": answer.prior_total,
                                "visual_tokens_kept": answer.prior_kept,
                                "note": "kept_token_indices and the mask are the current scan's"}
    paths.append(folder / "report.json")
    paths[-1].write_text(json.dumps(report, indent=1))
    for name, data in (pngs or {}).items():
        p = folder / f"{re.sub(r'[^a-z0-9_]', '', name.lower())}.png"
        p.write_bytes(data)
        paths.append(p)
    return paths
