"""Prepared bodies on disk: the training cases as `anatomy.load_background` makes them, in one file.

The GPU machine has no nibabel (it cannot read the sample cases' NIfTI files), and preparing two CTs
and finding the chest's lungs takes ~10 s of its start. So the bodies are prepared here once and
carried along (a git-ignored file of ~9 MB):

    python -m photon_core.train.synthetic.bodies --out runs/bodies/bodies.safetensors.xz

One safetensors file, xz-compressed: per case its frames as HU rounded to 1 HU (int16; the prepared
frames are (HU + 1000) / 2000, so they come back within 0.00025 of the model's unit) and each organ
mask as packed bits (exact). Its metadata names the sample-case files it was made from with their
SHA-256; `load_bodies` refuses a file made from other files. No pickle anywhere.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from photon_core.io import samples
from photon_core.train.synthetic.anatomy import Background, downsample_shape, load_background, shrink
from photon_core.train.synthetic.splits import TRAIN_CASES

FORMAT = "photon-demo-bodies-1"
UNIT_HU = 2000.0                       # frames = (HU + 1000) / 2000


def _sources(cases) -> dict:
    """{file of the sample-case folder: SHA-256} of the scans and label maps the bodies come from."""
    out = {}
    for c in cases:
        entry = samples.case(c)
        for key in ("file", "label_map"):
            out[entry[key]] = hashlib.sha256(samples.path(entry[key]).read_bytes()).hexdigest()
    return out


def save_bodies(path: str | Path, cases=TRAIN_CASES, downsample: float = 1.0) -> Path:
    """Prepare ``cases`` (on the coarser grid of ``downsample`` if > 1) and write them to ``path``."""
    tensors, organs = {}, {}
    for c in cases:
        bg = load_background(c)
        if downsample != 1:
            bg = shrink(bg, downsample_shape(downsample))
        tensors[f"{c}/frames"] = torch.round(bg.frames.float() * UNIT_HU).to(torch.int16)
        tensors[f"{c}/voxel_mm"] = torch.tensor(bg.voxel_mm, dtype=torch.float64)
        for name, m in bg.organs.items():
            tensors[f"{c}/organ/{name}"] = torch.from_numpy(np.packbits(m.cpu().numpy().ravel()))
        organs[c] = list(bg.organs)
    meta = {"format": FORMAT, "organs": json.dumps(organs), "sources": json.dumps(_sources(cases)),
            "downsample": str(downsample)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(lzma.compress(save_bytes(tensors, metadata=meta)))
    tmp.replace(path)
    return path


def load_bodies(path: str | Path, device="cpu", check_sources: bool = True) -> dict:
    """{case: `Background`} from a file `save_bodies` wrote; ValueError if it is not one, or if the
    sample cases it was made from have changed since."""
    data = lzma.decompress(Path(path).read_bytes())
    meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise ValueError(f"{Path(path).name} is not a prepared-bodies file ({FORMAT}); write one with "
                         f"python -m photon_core.train.synthetic.bodies --out {path}")
    organs = json.loads(meta["organs"])
    if check_sources and (now := _sources(organs)) != json.loads(meta["sources"]):
        raise ValueError(f"{Path(path).name} was made from other sample-case files than these "
                         f"({', '.join(now)}); write it again.")
    tensors = load_bytes(data)
    out = {}
    for c, names in organs.items():
        frames = tensors[f"{c}/frames"].float() / UNIT_HU
        n = frames.numel()
        masks = {o: torch.from_numpy(np.unpackbits(tensors[f"{c}/organ/{o}"].numpy(), count=n).astype(bool))
                 .reshape(frames.shape) for o in names}
        voxel = tuple(tensors[f"{c}/voxel_mm"].tolist())
        out[c] = Background(c, frames, masks, voxel).to(device)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="file to write (e.g. runs/bodies/bodies.safetensors.xz)")
    ap.add_argument("--cases", nargs="+", default=list(TRAIN_CASES))
    ap.add_argument("--downsample", type=float, default=1.0, help="store the coarser curriculum grid (tests)")
    args = ap.parse_args(argv)
    path = save_bodies(args.out, args.cases, args.downsample)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
