"""Tokenizer and the official Photon prompt (Qwen ChatML, the question AFTER the volume).

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|video_pad|>×N<|vision_end|>{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>

A question about change since a prior scan of the same patient puts the prior's vision span first:
``<|vision_start|>…prior…<|vision_end|><|vision_start|>…current…<|vision_end|>{question}``.

Any folder with a ``tokenizer.json`` (official Qwen2 folders ship one; so does our demo model) is
read with the `tokenizers` library — no network, no remote code.
"""
from __future__ import annotations

from pathlib import Path

import torch

SYSTEM = "You are a helpful assistant."
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
MAX_QUESTION_CHARS = 1000


class Tokenizer:
    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as _Tok

        path = Path(folder) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"'{Path(folder).name}' has no tokenizer.json; a Photon checkpoint folder "
                             f"must carry its tokenizer.")
        self.tok = _Tok.from_file(str(path))
        self.ids = {t: self.tok.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                               "<|video_pad|>") if self.ids[t] is None]
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
        pairs = {"<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id,
                 "<|video_pad|>": cfg.video_token_id, "<|im_end|>": cfg.eos_token_id}
        bad = {t: (self.ids[t], v) for t, v in pairs.items() if self.ids[t] != v}
        if bad:
            raise ValueError(f"Tokenizer and config.json disagree on special token ids: {bad}.")
        if self.vocab_size > cfg.vocab_size:
            raise ValueError(f"Tokenizer has {self.vocab_size} tokens but the model only {cfg.vocab_size}.")

    def prompt(self, question: str, n_visual: int, answer: str | None = None,
               prior_visual: int = 0) -> tuple[list[int], int]:
        """Token ids of the ChatML prompt (and the answer, for training); returns (ids, answer_start).

        ``prior_visual`` > 0: a prior scan of the same patient goes first, as its own vision span
        right before the current one (the question still follows the last volume)."""
        i = self.ids
        nl = self.encode("\n")
        span = lambda n: [i["<|vision_start|>"]] + [i["<|video_pad|>"]] * n + [i["<|vision_end|>"]]  # noqa: E731
        ids = ([i["<|im_start|>"]] + self.encode("system") + nl + self.encode(SYSTEM) + [i["<|im_end|>"]] + nl
               + [i["<|im_start|>"]] + self.encode("user") + nl
               + (span(prior_visual) if prior_visual else []) + span(n_visual)
               + self.encode(question) + [i["<|im_end|>"]] + nl
               + [i["<|im_start|>"]] + self.encode("assistant") + nl)
        start = len(ids)
        if answer is not None:
            ids += self.encode(answer) + [i["<|im_end|>"]]
        return ids, start


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
    return " ".join(q.split())


def batch_prompts(prompts: list[list[int]], pad_id: int, labels: list[list[int]] | None = None):
    """Left-pad prompts into (B, L) ids and mask (and labels, −100 on padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    lab = torch.full((len(prompts), L), -100, dtype=torch.long) if labels is not None else None
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p)
        mask[b, L - len(p):] = 1
        if lab is not None:
            lab[b, L - len(p):] = torch.tensor(labels[b])
    return ids, mask, lab
