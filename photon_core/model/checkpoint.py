"""Loading and saving Photon checkpoint folders (safetensors only), and what a loaded one is.

A folder holds ``config.json`` (HF layout, see config.py), ``model.safetensors`` or sharded
``model-0000k-of-0000n.safetensors`` + ``model.safetensors.index.json``, and the tokenizer files.
Official Photon-S1/S2 folders (transformers 4.51 key names) load unchanged; transformers-5 key
names (``model.language_model.*``, ``model.visual.*``) are mapped to the same layout.

What a folder may hold besides (ms-swift's ``args.json``, a hub repository's ``README.md`` and
``.gitattributes``, the S2 repository's ``results.zip``, images, sub-folders of other tasks) is
ignored and logged. Pickle files (``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, …) are never opened: beside
safetensors weights they are ignored; a folder whose weights exist only as pickles is refused with
a message saying to convert them.

S1 or S2 is read from the weights: threshold-MLP weights at the ITS layer
(``model.layers.<s>.atp.*``) make an S2 checkpoint; without them it is S1 (the aligned model of
the reference's ``modeling_photon_s1``, which has no token scheduling).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from photon_core.model.config import PhotonConfig
from photon_core.model.photon import PhotonModel

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
)
# Everything the loader, the tokenizer and the prompt read; any other file is ignored (and logged).
READ_FILES = (
    "config.json",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "model.safetensors",
    INDEX,
) + TOKENIZER_FILES
MAX_SHARD_BYTES = 16 * 1024 * 1024
_ITS_KEY = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.atp\.")


class CheckpointError(ValueError):
    """The folder is not a usable Photon checkpoint; the message says why."""


@dataclass(frozen=True)
class CheckpointInfo:
    """Which checkpoint a Predictor runs: where it came from and whether it schedules tokens."""

    source: Literal["embedded", "folder", "hub"]
    name: str  # what the card and the export show
    path: Path  # the local folder (reports show only its name)
    repo_id: str | None = None  # hub id, when fetched from the hub
    subfolder: str | None = None
    revision: str | None = None  # as the user named it (branch, tag or commit)
    stage: Literal["S1", "S2"] = "S2"
    has_its: bool = True  # S2: learned threshold θ at the ITS layer

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = self.path.name  # never a server path in a report
        return d

    def label(self) -> str:
        """One line: 'Alibaba-DAMO-Academy/Photon-S2 / 3D-RAD @ main (S2)', 'folder my_ckpt (S1)'."""
        if self.source == "hub":
            where = self.repo_id + (f" / {self.subfolder}" if self.subfolder else "")
            where += f" @ {self.revision}" if self.revision else ""
        elif self.source == "folder":
            where = f"folder {self.path.name}"
        else:
            where = self.name
        return f"{where} ({self.stage})"


def weight_files(path: Path) -> list[Path]:
    """The folder's safetensors weight files (through the index when sharded); checks the folder policy.

    Logs what it ignores; refuses a folder without config.json or without safetensors weights."""
    if not path.is_dir():
        raise CheckpointError(f"Model folder '{path}' does not exist or is not a folder.")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path.name}' is not a Photon checkpoint: it has no config.json.")
    index = path / INDEX
    if index.is_file():
        try:
            with open(index) as fh:
                shards = sorted(set(json.load(fh)["weight_map"].values()))
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"'{path.name}/{INDEX}' is not a safetensors index (no weight_map)."
            ) from None
        bad = [s for s in shards if "/" in s or "\\" in s or not s.endswith(".safetensors")]
        if bad:
            raise CheckpointError(
                f"'{path.name}/{INDEX}' names weight files that are not safetensors files of "
                f"this folder: {', '.join(bad[:3])}."
            )
        files = [path / s for s in shards]
    else:
        files = [path / "model.safetensors"]
    names = {f.name for f in files}
    entries = sorted(path.iterdir())
    pickles = [f.name for f in entries if f.name.lower().endswith(PICKLE_SUFFIXES)]
    if not any(f.is_file() for f in files):
        if pickles:
            raise CheckpointError(
                f"'{path.name}' holds its weights only as pickle files ({', '.join(pickles[:3])}), which are "
                f"never opened here (unpickling runs code). Convert them to safetensors in a trusted "
                f"environment (e.g. load them with transformers there and save_pretrained(..., "
                f"safe_serialization=True))."
            )
        others = [f.name for f in entries if f.name.endswith(".safetensors")]
        hint = (
            f" (it has {', '.join(others[:3])}: an adapter or optimizer state, not the model)"
            if others
            else ""
        )
        raise CheckpointError(
            f"'{path.name}' has no model weights: no model.safetensors and no {INDEX}{hint}."
        )
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"'{path.name}' is missing weight files: {', '.join(missing)}.")
    ignored = [
        f.name + ("/" if f.is_dir() else "")
        for f in entries
        if f.name not in READ_FILES and f.name not in names
    ]
    if ignored:
        log.info(
            "Checkpoint '%s': ignoring %s%s",
            path.name,
            ", ".join(ignored[:12]),
            f" and {len(ignored) - 12} more" if len(ignored) > 12 else "",
        )
    return files


def _names_in(f: Path) -> list[str]:
    """Tensor names of a safetensors file, read from its header (no tensor is loaded)."""
    try:
        with safe_open(str(f), framework="pt") as fh:
            return list(fh.keys())
    except Exception as e:
        raise _unreadable(f, e) from None


def _unreadable(f: Path, e: Exception) -> CheckpointError:
    """Why a weight file cannot be read, in words: a Git LFS pointer (a clone without git-lfs) says so."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return CheckpointError(
            f"'{f.name}' is a Git LFS pointer, not the weights: the repository was cloned without git-lfs. "
            f"Run 'git lfs pull' in the folder (or download it with huggingface_hub)."
        )
    return CheckpointError(f"'{f.name}' is not a readable safetensors file ({type(e).__name__}: {e}).")


def _check_index(path: Path, files: list[Path]) -> list[str]:
    """The tensor names of the weight files (read from their headers). Each tensor the index lists must
    be in the file it names: a shard replaced or cut short would otherwise drop tensors without a word (an
    S2 shard without its ITS tensors would load as S1)."""
    per_file = {f.name: _names_in(f) for f in files}
    index = path / INDEX
    if index.is_file():
        with open(index) as fh:
            weight_map = json.load(fh)["weight_map"]
        for name, keys in per_file.items():
            held = set(keys)
            lacking = sorted(k for k, where in weight_map.items() if where == name and k not in held)
            if lacking:
                raise CheckpointError(
                    f"'{name}' lacks {len(lacking)} tensor{'s' if len(lacking) > 1 else ''} that "
                    f"'{INDEX}' puts there ({', '.join(lacking[:3])}{'…' if len(lacking) > 3 else ''}): "
                    f"the file is incomplete or from another checkpoint; download it again."
                )
    return [n for keys in per_file.values() for n in keys]


def _declared_its(config: Path) -> bool | None:
    """``photon.has_its`` when config.json states it (folders this project writes do), else None."""
    with open(config) as fh:
        value = (json.load(fh).get("photon") or {}).get("has_its")
    return value if isinstance(value, bool) else None


def stage_of(names: list[str], cfg: PhotonConfig) -> bool:
    """True (S2) if the weights hold the threshold MLP at the config's ITS layer, False (S1) if none."""
    layers = sorted({int(m.group(1)) for n in names if (m := _ITS_KEY.match(n))})
    if not layers:
        return False
    if layers != [int(cfg.its_layer)]:
        raise CheckpointError(
            f"The checkpoint has token-scheduling weights at decoder layer(s) {layers}, but its "
            f"config puts ITS at layer {cfg.its_layer} (int(num_hidden_layers / 4 - 1))."
        )
    return True


def _rename(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def load_model(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> PhotonModel:
    """Build a `PhotonModel` from a checkpoint folder. bf16 on CUDA, fp32 on CPU unless ``dtype``.

    The weights decide S1 or S2 (``model.config.has_its``)."""
    path = Path(path)
    files = weight_files(path)
    cfg = PhotonConfig.from_file(path / "config.json")
    names = _check_index(path, files)
    has_its = stage_of([_rename(n) for n in names], cfg)
    declared = _declared_its(path / "config.json")
    if declared is not None and declared != has_its:
        raise CheckpointError(
            f"'{path.name}/config.json' says the model {'schedules' if declared else 'does not schedule'} "
            f"tokens (photon.has_its = {str(declared).lower()}), but its weights "
            f"{'hold no' if declared else 'hold'} token-scheduling (ITS) tensors: the weights are "
            f"incomplete or from another stage."
        )
    cfg = replace(cfg, has_its=has_its)
    state = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:
            raise _unreadable(f, e) from None
        state.update({_rename(k): v for k, v in part.items()})
    with torch.device("meta"):
        model = PhotonModel(cfg)
    model = model.to_empty(device="cpu")
    own = model.state_dict()
    expected = set(own)
    if cfg.tie_word_embeddings:
        head = state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
        embed = state.get("model.embed_tokens.weight")
        if head is not None and embed is not None and not torch.equal(head, embed):
            log.warning("Checkpoint '%s': config.json ties the output layer to the embeddings "
                        "(tie_word_embeddings), so its stored lm_head.weight, which differs from them, is "
                        "not used (as transformers does)", path.name)
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if "visual.patch_embed.proj.weight" in unexpected:
        raise CheckpointError(
            "The checkpoint has a stock Qwen2.5-VL image patch embed "
            "('visual.patch_embed'), not Photon's 3-D CT patch embed."
        )
    if missing or unexpected:
        raise CheckpointError(
            f"'{path.name}' does not match the Photon architecture of its config: "
            f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
            f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}."
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(
                f"Weight '{k}' has shape {tuple(v.shape)} but the config implies "
                f"{tuple(own[k].shape)}; the checkpoint and config.json disagree."
            )
        if not v.is_floating_point():
            raise CheckpointError(
                f"Weight '{k}' is stored as {str(v.dtype).removeprefix('torch.')}; model weights are "
                f"floating point (a quantised checkpoint is not read here)."
            )
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    model.reset_buffers()  # built on meta; rotary frequencies stay fp32
    model.eval()
    return model


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` with storage of its own (safetensors refuses views of a larger tensor, e.g. fused weights)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_model(model: PhotonModel, path: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write config.json and safetensors shards (≤ ``max_shard_bytes`` each), official key names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {k: _own(v.detach().contiguous().cpu()) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    shards, cur, size = [], {}, 0
    for k in sorted(state):
        n = state[k].numel() * state[k].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = state[k]
        size += n
    shards.append(cur)
    for old in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        old.unlink()
    written = []
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        written.append(path / "model.safetensors")
    else:
        weight_map = {}
        for i, sh in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(sh, str(path / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
            written.append(path / name)
        with open(path / "model.safetensors.index.json", "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return written
