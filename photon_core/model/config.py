"""Photon configuration: dataclasses that read and write the official HF `config.json` layout.

Official Photon folders were saved by transformers 4.51 (`model_type: qwen2_5_vl`). Two traps:
``vision_config.in_chans`` (1 for CT) is the key the model must use — transformers 5.x reads
``in_channels`` (default 3) instead — and ``rope_scaling.mrope_section`` may sit under
``rope_scaling`` or ``rope_parameters``. We read both and write both, so a folder we save loads the
same way everywhere.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


@dataclass
class VisionConfig:
    depth: int = 32                      # vision transformer blocks
    hidden_size: int = 1280              # width of the vision blocks
    num_heads: int = 16
    intermediate_size: int = 3420        # SwiGLU width of the vision MLP
    out_hidden_size: int = 2048          # merger output = LLM hidden size
    in_chans: int = 1                    # CT: one channel
    patch_size: int = 14                 # spatial patch (pixels)
    temporal_patch_size: int = 14        # slices per patch (14³ volume patches)
    spatial_merge_size: int = 2          # 2×2 patches -> one LLM token
    window_size: int = 112               # windowed attention span in pixels
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2           # temporal RoPE step factor (× second_per_grid_t)
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6


@dataclass
class PhotonConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    tie_word_embeddings: bool = True
    hidden_act: str = "silu"
    bos_token_id: int = 151643
    eos_token_id: int = 151645           # <|im_end|>: also ends the instruction span for ITS
    pad_token_id: int = 151643
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656
    max_position_embeddings: int = 128000
    second_per_grid_t: float = 14.0      # temporal_patch_size / FPS with the official FPS = 1
    its_layer: int | None = None         # None -> int(num_hidden_layers / 4 - 1), the official rule
    has_its: bool = True                 # S2 (threshold MLP at its_layer) or S1 (aligned, no ITS weights):
                                         # the checkpoint's weights decide when it is loaded
    vision: VisionConfig = field(default_factory=VisionConfig)
    model_name: str = "Photon"           # provenance shown in the app

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.its_layer is None:
            self.its_layer = int(self.num_hidden_layers / 4 - 1)
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        v = self.vision
        checks = [
            (self.hidden_size > 0 and self.num_attention_heads > 0 and self.num_hidden_layers > 0,
             "hidden_size, num_attention_heads and num_hidden_layers must be positive"),
            (self.hidden_size % self.num_attention_heads == 0,
             "hidden_size should be divisible by num_attention_heads"),
            (self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0,
             "num_attention_heads should be divisible by num_key_value_heads"),
            (sum(self.mrope_section) * 2 == self.head_dim,
             f"mrope_section {self.mrope_section} should sum to head_dim/2 = {self.head_dim // 2}"),
            (0 <= int(self.its_layer) < self.num_hidden_layers,
             f"its_layer {self.its_layer} outside 0..{self.num_hidden_layers - 1}"),
            (v.hidden_size % v.num_heads == 0, "vision hidden_size should be divisible by num_heads"),
            (v.out_hidden_size == self.hidden_size,
             "vision out_hidden_size should equal the LLM hidden_size"),
            (all(0 <= i < v.depth for i in v.fullatt_block_indexes),
             "vision fullatt_block_indexes should lie within depth"),
            (v.in_chans >= 1 and v.patch_size > 0 and v.temporal_patch_size > 0 and v.spatial_merge_size > 0,
             "vision patch sizes and in_chans must be positive"),
            (0 < self.vocab_size < 10_000_000, "vocab_size is not plausible"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"Invalid Photon config: {msg}.")

    # ---------------------------------------------------------------- HF config.json layout
    @classmethod
    def from_hf_dict(cls, d: dict) -> PhotonConfig:
        d = dict(d)
        if d.get("model_type") not in ("qwen2_5_vl", "photon"):
            raise ValueError(f"config.json has model_type {d.get('model_type')!r}; expected a Photon "
                             f"(qwen2_5_vl) checkpoint.")
        text = d.get("text_config") or {}
        merged = {**d, **{k: v for k, v in text.items() if k not in d}}
        rope = merged.get("rope_scaling") or merged.get("rope_parameters") or {}
        vd = dict(merged.get("vision_config") or {})
        vd["in_chans"] = vd.get("in_chans", vd.get("in_channels", 1))
        vkeys = {f.name for f in fields(VisionConfig)}
        vision = VisionConfig(**{k: v for k, v in vd.items() if k in vkeys})
        pkeys = {f.name for f in fields(cls)} - {"vision", "mrope_section"}
        kwargs = {k: v for k, v in merged.items() if k in pkeys}
        if "rope_theta" not in kwargs and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        photon = d.get("photon") or {}
        kwargs.update({k: v for k, v in photon.items() if k in pkeys})
        mrope = rope.get("mrope_section", [16, 24, 24])
        _check_types(kwargs, cls(), "")
        _check_types(vd, VisionConfig(), "vision_config.")
        _check_types({"mrope_section": mrope}, cls(), "rope_scaling.")
        return cls(vision=vision, mrope_section=list(mrope), **kwargs)

    def to_hf_dict(self) -> dict:
        own = asdict(self)
        vision = own.pop("vision")
        vision["in_channels"] = vision["in_chans"]       # so transformers 5.x builds the same embed
        vision["spatial_patch_size"] = vision["patch_size"]
        vision["model_type"] = "qwen2_5_vl"
        mrope = own.pop("mrope_section")
        photon = {k: own.pop(k) for k in ("its_layer", "has_its", "second_per_grid_t", "model_name")}
        return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
                **own, "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": mrope},
                "vision_config": vision, "photon": photon, "torch_dtype": "float32"}

    @classmethod
    def from_file(cls, path: str | Path) -> PhotonConfig:
        path = Path(path)
        where = f"'{path.parent.name}/{path.name}'"
        try:
            with open(path) as f:
                d = json.load(f)
        except ValueError as e:
            raise ValueError(f"{where} is not valid JSON ({e}).") from None
        if not isinstance(d, dict):
            raise ValueError(f"{where} holds a JSON {type(d).__name__}, not the object of a model config.")
        try:
            return cls.from_hf_dict(d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def save(self, path: str | Path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_hf_dict(), f, indent=2)


def _check_types(values: dict, defaults, prefix: str) -> None:
    """Each value of a known field has its default's type (a number for a float), else a ValueError
    naming the field: a config with ``"num_hidden_layers": "8"`` would fail later in arithmetic."""
    for k, v in values.items():
        default = getattr(defaults, k, None)
        if default is None or isinstance(default, VisionConfig) or (v is None and k.endswith("_token_id")):
            continue                                    # (HF configs may leave a special token null)
        if isinstance(default, bool):
            ok = isinstance(v, bool)
        elif isinstance(default, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif isinstance(default, int):
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif isinstance(default, list):
            ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
        else:
            ok = isinstance(v, type(default))
        if not ok:
            raise ValueError(f"{prefix}{k} is {v!r}, where a value like {default!r} belongs")


def preset_config(preset: str, vision: dict | None = None, **kw) -> PhotonConfig:
    """The tiny (tests) or demo model's sizes; ``vision`` and ``kw`` add to / override them."""
    if preset == "tiny":
        llm = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                   num_key_value_heads=1, mrope_section=[2, 3, 3])
        vis = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=32,
                   fullatt_block_indexes=[1])
    else:
        llm = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=8, num_attention_heads=4,
                   num_key_value_heads=2, mrope_section=[4, 6, 6])
        vis = dict(depth=4, hidden_size=96, num_heads=4, intermediate_size=192, out_hidden_size=128,
                   fullatt_block_indexes=[1, 3])
    return PhotonConfig(**{**llm, **kw}, vision=VisionConfig(**{**vis, **(vision or {})}))
