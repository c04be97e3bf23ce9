"""The demo model's tokenizer and its model configuration (special token ids from the tokenizer)."""
from __future__ import annotations

import json
from pathlib import Path

from photon_core.inference.prompt import SPECIAL_TOKENS, Tokenizer
from photon_core.model.config import PhotonConfig, preset_config


def model_config(preset: str, vocab_size: int, tok: Tokenizer, vision: dict | None = None) -> PhotonConfig:
    """The preset's sizes with ``tok``'s special tokens; ``vision`` overrides vision-tower fields."""
    ids = tok.ids
    common = dict(vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                  eos_token_id=ids["<|im_end|>"], vision_start_token_id=ids["<|vision_start|>"],
                  vision_end_token_id=ids["<|vision_end|>"], vision_token_id=ids["<|vision_pad|>"],
                  image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  max_position_embeddings=4096, model_name="Photon demo (synthetic findings)")
    return preset_config(preset, vision=vision, **common)


def build_tokenizer(folder: Path, vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE (Qwen-style) trained on the question templates, with ChatML/vision specials."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from photon_core.train.synthetic.questions import all_template_text  # (the data imports torch)

    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = all_template_text() + ["system", "user", "assistant", "You are a helpful assistant.", "\n"]
    tok.train_from_iterator(corpus * 4, trainer)
    write_tokenizer(tok, folder)
    return Tokenizer(folder)


def write_tokenizer(tok, folder: Path) -> None:
    """``tokenizer.json`` and the one ``tokenizer_config.json`` every checkpoint we write carries."""
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>", "model_max_length": 4096}, indent=1))
