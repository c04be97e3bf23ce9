"""Tokenizer, the official Photon prompt (ms-swift's ``photon_s1`` / ``photon_s2`` templates) and the
generation settings a checkpoint folder asks for.

The reference's templates are Qwen ChatML with the default system prompt; the volume tag becomes
one vision span and the question follows it (the question comes AFTER the volume):

    <|im_start|>system\nYou are a helpful assistant.<|im_end|>\n
    <|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{question}<|im_end|>\n
    <|im_start|>assistant\n{answer}<|im_end|>

The text is tokenised as one string (special tokens split out by the tokenizer, as ms-swift does),
then the single ``<|video_pad|>`` of each volume is expanded to its N visual tokens. The user turn is
``<video>{question}``: what ms-swift builds when a question comes with a volume but no tag in the
text (its ``_add_default_tags`` puts the tag first). tests/fixtures/official_prompt records the
reference template's ids for several questions. A question about change since a prior scan puts
the prior's vision span first: ``<|vision_start|>…prior…<|vision_end|><|vision_start|>…current…
<|vision_end|>{question}`` (``<video><video>{question}`` in ms-swift's terms).

Any folder with a ``tokenizer.json`` (official Qwen2 folders ship one; so does our demo model) is
read with the `tokenizers` library — no network, no remote code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
MAX_QUESTION_CHARS = 1000
VOLUME_SPAN = "<|vision_start|><|video_pad|><|vision_end|>"  # what the template puts for one <video> tag


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(
                f"'{Path(folder).name}' has no tokenizer.json; a Photon checkpoint folder "
                f"must carry its tokenizer."
            )
        self.tok = _Tok.from_file(str(path))
        self.ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [
            t
            for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")
            if self.ids[t] is None
        ]
        if missing:
            raise ValueError(f"The tokenizer lacks the special tokens {missing}.")

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True).strip()

    def check_config(self, cfg) -> None:
        """The tokenizer and the model config must agree on the special token ids."""
        pairs = {
            "<|vision_start|>": cfg.vision_start_token_id,
            "<|vision_end|>": cfg.vision_end_token_id,
            "<|video_pad|>": cfg.video_token_id,
            "<|im_end|>": cfg.eos_token_id,
        }
        bad = {t: (self.ids[t], v) for t, v in pairs.items() if self.ids[t] != v}
        if bad:
            raise ValueError(f"Tokenizer and config.json disagree on special token ids: {bad}.")
        if self.vocab_size > cfg.vocab_size:
            raise ValueError(f"Tokenizer has {self.vocab_size} tokens but the model only {cfg.vocab_size}.")

    @staticmethod
    def render(question: str, volumes: int = 1) -> str:
        """The template's text with one ``<|video_pad|>`` per volume (before expansion)."""
        return (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{VOLUME_SPAN * volumes}{question}"
            f"<|im_end|>\n<|im_start|>assistant\n"
        )

    def prompt(
        self, question: str, n_visual: int, answer: str | None = None, prior_visual: int = 0
    ) -> tuple[list[int], int]:
        """Token ids of the ChatML prompt (and the answer, for training); returns (ids, answer_start).

        ``prior_visual`` > 0: a prior scan of the same patient goes first, as its own vision span
        right before the current one (the question still follows the last volume)."""
        pad = self.ids["<|video_pad|>"]
        counts = ([prior_visual] if prior_visual else []) + [n_visual]
        ids = self.encode(self.render(question, len(counts)))
        if ids.count(pad) != len(counts):
            raise ValueError("The question contains the text of a reserved token (<|video_pad|>).")
        out: list[int] = []
        for t in ids:
            out += [pad] * counts.pop(0) if t == pad else [t]
        start = len(out)
        if answer is not None:
            out += self.encode(answer) + [self.ids["<|im_end|>"]]
        return out, start


def clean_question(question) -> str:
    """Normalise a user's question; raises ValueError with a readable message if unusable."""
    if isinstance(question, bytes):
        question = question.decode("utf-8", errors="replace")
    if not isinstance(question, str):
        raise ValueError("The question must be text.")
    q = "".join(ch if ch.isprintable() or ch in "\n\t" else " " for ch in question).strip()
    if not q:
        raise ValueError("Please type a question about the scan.")
    if len(q) > MAX_QUESTION_CHARS:
        raise ValueError(f"The question is {len(q)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    reserved = [t for t in SPECIAL_TOKENS if t in q]
    if reserved:
        raise ValueError(f"The question contains {reserved[0]}, a token reserved for the prompt's layout.")
    return " ".join(q.split())


def batch_prompts(prompts: list[list[int]], pad_id: int, labels: list[list[int]] | None = None):
    """Left-pad prompts into (B, L) ids and mask (and labels, −100 on padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    lab = torch.full((len(prompts), L), -100, dtype=torch.long) if labels is not None else None
    for b, p in enumerate(prompts):
        ids[b, L - len(p) :] = torch.tensor(p)
        mask[b, L - len(p) :] = 1
        if lab is not None:
            lab[b, L - len(p) :] = torch.tensor(labels[b])
    return ids, mask, lab


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding as the checkpoint's ``generation_config.json`` asks, read the way ms-swift's ``swift infer``
    reads it: greedy when ``do_sample`` is false or the temperature is 0, else sampling with its
    temperature / top_k / top_p (transformers' defaults where the file is silent; top_k 1 is greedy in
    effect);
    ``repetition_penalty`` applies either way. Stops at any of ``eos_token_ids`` (the config's EOS,
    the file's, and ``<|endoftext|>``, a stop word of the Qwen templates). No file: greedy, no penalty."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_folder(cls, folder: str | Path, eos_token_id: int, tokenizer: Tokenizer | None = None):
        path = Path(folder) / "generation_config.json"
        d = json.loads(path.read_text()) if path.is_file() else {}
        eos = d.get("eos_token_id")
        ids = [eos_token_id] + (eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer is not None and tokenizer.ids.get("<|endoftext|>") is not None:
            ids.append(tokenizer.ids["<|endoftext|>"])
        get = lambda k, default: default if d.get(k) is None else d[k]  # noqa: E731  (transformers' defaults)
        temperature = float(get("temperature", 1.0))
        sample = bool(get("do_sample", False)) and temperature != 0
        return cls(
            do_sample=sample,
            temperature=temperature if sample else 1.0,
            top_k=int(get("top_k", 50)) if sample else 0,
            top_p=float(get("top_p", 1.0)) if sample else 1.0,
            repetition_penalty=float(get("repetition_penalty", 1.0)),
            eos_token_ids=tuple(dict.fromkeys(int(i) for i in ids)),
        )
