"""Pool speed: the ``hf`` engine batched vs a per-prompt ``generate`` loop, and the reward-model
judge batched vs a per-completion loop, on the same inputs in one run (ratios printed).

The model is ``models/base`` (SmolLM2-135M-Instruct) when it exists, else a tiny offline model;
the reward model is the same backbone with a (seeded, random) one-output head, which costs what
a real reward model of that size costs. Each side runs ``--repeats`` times; the minimum counts
(a shared machine's noise only ever adds time).

    python -m benchmarks.pool [--prompts 16] [--tokens 32] [--batch 16] [--repeats 2]
    python -m benchmarks.pool --only judge --device cuda --completions 512   # on a GPU
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import polars as pl

from karma.generation.engines import HFEngine
from karma.generation.settings import GenerateConfig, PoolModel
from karma.judging.llm_judge import reward_scores, reward_texts
from tests.fixtures import build_tiny_model

QUESTIONS = [
    "What is the capital of {}?",
    "Write one sentence about {}.",
    "Name two facts about {}.",
    "Is {} large? Answer briefly.",
]
TOPICS = ["France", "water", "the moon", "Italy", "energy", "Spain", "volcanoes", "libraries"]


def prompts(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": QUESTIONS[i % 4].format(TOPICS[i % 8])}] for i in range(n)]


def best(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench_generate(model: str, n: int, tokens: int, batch: int, repeats: int) -> float:
    cfg = GenerateConfig(max_new_tokens=tokens, batch_size=batch)
    eng = HFEngine(PoolModel(model=model), cfg)
    chats = prompts(n)
    eng.generate(chats[:2], 0)  # warm-up

    def batched() -> None:
        for i in range(0, n, batch):
            eng.generate(chats[i : i + batch], 0)

    def loop() -> None:
        for chat in chats:
            eng.generate([chat], 0)

    tb, tl = best(batched, repeats), best(loop, repeats)
    print(
        f"generate: {n} prompts x {tokens} tokens, batch {batch}: batched {tb:.2f} s, "
        f"per-prompt loop {tl:.2f} s, ratio {tl / tb:.2f}x"
    )
    return tl / tb


def bench_reward(model: str, n: int, batch: int, repeats: int, device: str = "cpu") -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    rm = AutoModelForSequenceClassification.from_pretrained(model, num_labels=1).eval().to(device)
    rm.config.pad_token_id = tok.pad_token_id
    chats = prompts(n)
    pairs = [
        (c[0]["content"], f"An answer about {TOPICS[i % 8]} " * (3 + i % 5))
        for i, c in enumerate(chats)
    ]
    texts = reward_texts(tok, pairs)
    reward_scores(rm, tok, texts[:2], batch, 512)  # warm-up
    tb = best(lambda: reward_scores(rm, tok, texts, batch, 512), repeats)
    tl = best(lambda: [reward_scores(rm, tok, [t], 1, 512) for t in texts], repeats)
    a = reward_scores(rm, tok, texts, batch, 512)
    b = [reward_scores(rm, tok, [t], 1, 512)[0] for t in texts]
    diff = max(abs(x - y) for x, y in zip(a, b, strict=True))
    print(
        f"judge (reward model): {n} completions, batch {batch}: batched {tb:.2f} s, "
        f"per-completion loop {tl:.2f} s, ratio {tl / tb:.2f}x (max |batched - single| "
        f"{diff:.1e})"
    )
    return tl / tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--completions", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="torch device of the reward model (cuda)")
    ap.add_argument("--only", choices=["all", "generate", "judge"], default="all")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)  # the stages' default (2 threads stall on a shared CPU)
    model = Path("models/base")
    with tempfile.TemporaryDirectory() as tmp:
        where = (
            str(model)
            if (model / "config.json").is_file()
            else str(build_tiny_model(Path(tmp) / "tiny", hidden_size=256, num_layers=4))
        )
        print(f"model: {where}, torch threads: {__import__('torch').get_num_threads()}")
        rows = []
        if args.only in ("all", "generate"):
            rows.append(("hf generate", bench_generate(where, args.prompts, args.tokens,
                                                       args.batch, args.repeats)))  # fmt: skip
        if args.only in ("all", "judge"):
            rows.append((f"reward judge ({args.device})", bench_reward(
                where, args.completions, args.batch, args.repeats, args.device)))  # fmt: skip
    print(pl.DataFrame(rows, schema=["benchmark", "speed-up"], orient="row")
          .with_columns(target=pl.lit(3.0)))  # fmt: skip


if __name__ == "__main__":
    main()
