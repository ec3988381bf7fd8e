"""A tiny causal LM built offline (local tokenizer + random Llama), for tests and benchmarks.

>>> from karma.tiny import build_tiny_model
>>> path = build_tiny_model("/tmp/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
_WORDS = [
    "the",
    "a",
    "an",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "be",
    "by",
    "this",
    "are",
    "or",
    "from",
    "at",
    "not",
    "answer",
    "question",
    "write",
    "list",
    "number",
    "sum",
    "capital",
    "city",
    "country",
    "paris",
    "france",
    "berlin",
    "germany",
    "rome",
    "italy",
    "madrid",
    "spain",
    "science",
    "energy",
    "water",
    "earth",
    "sun",
    "moon",
    "planet",
    "cell",
    "atom",
    "light",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "hundred",
    "plus",
    "minus",
    "times",
    "equals",
    "yes",
    "no",
    "true",
    "false",
    "good",
    "bad",
    "short",
    "long",
    "sentence",
    "word",
    "words",
    "bullet",
    "points",
    "json",
    "format",
    "please",
    "explain",
    "describe",
    "because",
    "therefore",
    "however",
    "model",
    "response",
    "helpful",
    "assistant",
    "user",
    "system",
    "instruction",
    "example",
    "story",
    "poem",
    "email",
    "summary",
    "title",
    "reason",
    "step",
    "first",
    "second",
    "finally",
]


def _corpus(n: int = 400) -> list[str]:
    import random

    rng = random.Random(0)
    lines = []
    for _ in range(n):
        words = rng.choices(_WORDS, k=rng.randint(5, 25))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ":", ","]) + " 0123456789")
    return lines


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer offline and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_model(
    out_dir: str | Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
) -> Path:
    """Save a tiny random Llama + tokenizer to ``out_dir`` and return the path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    log.info("tiny model (%d parameters) saved to %s", model.num_parameters(), out)
    return out
