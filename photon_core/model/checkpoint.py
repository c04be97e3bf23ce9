"""Loading and saving Photon checkpoint folders (safetensors only).

A folder holds ``config.json`` (HF layout, see config.py), ``model.safetensors`` or sharded
``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``, and the tokenizer files.
Official Photon-S1/S2 folders (transformers 4.51 key names) load unchanged; transformers-5 key
names (``model.language_model.*``, ``model.visual.*``) are mapped to the same layout.
Pickle-based weight files are refused, never opened.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from photon_core.model.config import PhotonConfig
from photon_core.model.photon import PhotonModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz", ".joblib")
ALLOWED_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "video_preprocessor_config.json", "MODEL_CARD.md", "README.md", "LICENSE", "NOTICE", "eval.json",
    "training_args.json", "trainer_state.json", "train_state.json", "optimizer.safetensors", "configuration.json",
    "aux_head.safetensors", ".gitattributes",
}
MAX_SHARD_BYTES = 16 * 1024 * 1024


class CheckpointError(ValueError):
    """The folder is not a usable Photon checkpoint; the message says why."""


def _check_folder(path: Path) -> list[Path]:
    if not path.is_dir():
        raise CheckpointError(f"Model folder '{path}' does not exist or is not a folder.")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"'{path.name}' is not a Photon checkpoint: it has no config.json.")
    for f in path.iterdir():
        if f.name.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"'{path.name}' contains '{f.name}', a pickle-based file. Only "
                                  f"safetensors weights are accepted; convert it with the safetensors "
                                  f"library in a trusted environment.")
        if f.is_file() and f.name not in ALLOWED_FILES and not (
                f.name.startswith("model-") and f.name.endswith(".safetensors")):
            raise CheckpointError(f"'{path.name}' contains an unexpected file '{f.name}'; a Photon "
                                  f"checkpoint folder holds config, safetensors weights and tokenizer files.")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        files = [path / s for s in shards]
    else:
        files = [path / "model.safetensors"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"'{path.name}' is missing weight files: {', '.join(missing)}.")
    return files


def _rename(key: str) -> str:
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> PhotonModel:
    """Build a `PhotonModel` from a checkpoint folder. bf16 on CUDA, fp32 on CPU unless ``dtype``."""
    path = Path(path)
    files = _check_folder(path)
    cfg = PhotonConfig.from_file(path / "config.json")
    state = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as e:
            raise CheckpointError(f"'{f.name}' is not a readable safetensors file ({type(e).__name__}).") from None
        state.update({_rename(k): v for k, v in part.items()})
    with torch.device("meta"):
        model = PhotonModel(cfg)
    model = model.to_empty(device="cpu")
    own = model.state_dict()
    expected = set(own)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if "visual.patch_embed.proj.weight" in unexpected:
        raise CheckpointError("The checkpoint has a stock Qwen2.5-VL image patch embed "
                              "('visual.patch_embed'), not Photon's 3-D CT patch embed.")
    if missing or unexpected:
        raise CheckpointError(f"'{path.name}' does not match the Photon architecture of its config: "
                              f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected "
                              f"{unexpected[:5]}{'…' if len(unexpected) > 5 else ''}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise CheckpointError(f"Weight '{k}' has shape {tuple(v.shape)} but the config implies "
                                  f"{tuple(own[k].shape)}; the checkpoint and config.json disagree.")
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    model.reset_buffers()   # built on meta; rotary frequencies stay fp32
    model.eval()
    return model


def save_model(model: PhotonModel, path: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write config.json and safetensors shards (≤ ``max_shard_bytes`` each), official key names."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.save(path / "config.json")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
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
