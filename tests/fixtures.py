"""Fixtures shared by the tests and the benchmarks (not part of the package).

* :func:`build_tiny_model`: a tiny causal LM built offline (local BPE tokenizer with a chat
  template + a random Llama), seconds to build;
* :func:`synthetic_pairs`: preference pairs in the preferences stage's schema;
* :func:`synthetic_records`: UltraFeedback-shaped Parquet (4 completions per instruction);
* :func:`real_record`: one record with every key of the real ``openbmb/UltraFeedback`` layout;
* :func:`run_karma`, :func:`error_line`, :func:`one_error_line`: ``karma`` in-process and its
  one-line error contract (the ``karma_cli`` fixture in ``conftest.py`` wraps the first).

Benchmarks import them as ``tests.fixtures`` (run them as ``python -m benchmarks.<name>``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

if TYPE_CHECKING:  # benchmarks import this module without the test extras
    import pytest

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SCORES = REPO / "data/origin/scores.csv"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
WORDS = [
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
        words = rng.choices(WORDS, k=rng.randint(5, 25))
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
    initializer_range: float = 0.02,
) -> Path:
    """Save a tiny random Llama + tokenizer to ``out_dir`` and return the path.

    A larger ``initializer_range`` (e.g. 0.3) gives a model whose greedy answers are varied
    text rather than one repeated token.
    """
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
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out))
    log.info("tiny model (%d parameters) saved to %s", model.num_parameters(), out)
    return out


def synthetic_pairs(n: int, *, seed: int = 0, ratings: bool = True) -> pl.DataFrame:
    """``n`` random preference pairs in the preferences stage's schema (tests and benchmarks)."""
    import random

    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) + rng.choice([".", "?", "!"])

    models = [f"model-{c}" for c in "abcdef"]
    s_pref = {m: round(rng.random(), 4) for m in models}
    rows = []
    for i in range(n):
        a, b = rng.sample(models, 2)
        if s_pref[a] < s_pref[b]:
            a, b = b, a
        rows.append(
            {
                "prompt": [{"role": "user", "content": text(3, 30)}],
                "chosen": [{"role": "assistant", "content": text(1, 60)}],
                "rejected": [{"role": "assistant", "content": text(1, 60)}],
                "prompt_id": f"p{i:05d}",
                "chosen_model": a,
                "rejected_model": b,
                "kinship": round(rng.uniform(0.1, 1.0), 4),
                "s_pref_chosen": s_pref[a],
                "s_pref_rejected": s_pref[b],
                "chosen_rating": float(rng.randint(3, 5)) if ratings else None,
                "rejected_rating": float(rng.randint(1, 3)) if ratings else None,
            }
        )
    schema = {"chosen_rating": pl.Float64, "rejected_rating": pl.Float64}
    return pl.DataFrame(rows, schema_overrides=schema)


_VOCAB = (
    "the a model answer data light water energy system result value first second because "
    "therefore however example simple number people time world science question reason"
)
RECORD_WORDS = _VOCAB.split()


def synthetic_records(n: int, path: Path, seed: int = 0) -> None:
    """Write ``n`` UltraFeedback-shaped records (4 completions each) to ``path`` (Parquet)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    models = [*pl.read_csv(SCORES)["model"].to_list(), "ultralm-65b"]
    pool = [
        " ".join(rng.choice(RECORD_WORDS, size=int(rng.integers(18, 30)))).capitalize() + "."
        for _ in range(4096)
    ]
    m = len(models)
    # 4 distinct models per instruction: a random permutation prefix
    pick = np.argsort(rng.random((n, m)), axis=1)[:, :4].reshape(-1)
    c = 4 * n
    text_idx = rng.integers(0, len(pool), c)
    blank = rng.random(c) < 0.01
    score = np.round(rng.uniform(1, 10, c) * 2) / 2
    na = rng.random(c) < 0.02
    flat = pl.DataFrame(
        {
            "row": np.repeat(np.arange(n, dtype=np.int64), 4),
            "model": pl.Series(models).gather(pick),
            "t": pl.Series(pool).gather(text_idx),
            "blank": blank,
            "overall_score": np.where(na, np.nan, score),
            "fine-grained_score": np.round(score / 2, 2),
        }
    )
    dup = pl.Series(rng.random(c) < 0.02)  # copy the previous completion's text
    flat = flat.with_columns(
        response=pl.when(pl.col("blank"))
        .then(pl.lit(""))
        .when(dup & (pl.int_range(pl.len()) % 4 > 0))
        .then(pl.format("Answer {}: {}", pl.col("row"), pl.col("t").shift(1)))
        .otherwise(pl.format("Answer {}: {}", pl.col("row"), pl.col("t"))),
        overall_score=pl.col("overall_score").fill_nan(None),
    )
    nested = flat.group_by("row", maintain_order=True).agg(
        completions=pl.struct("model", "response", "overall_score", "fine-grained_score")
    )
    df = nested.select(
        pl.lit("evol_instruct").alias("source"),
        pl.format("Instruction {}: explain the topic in a few sentences.", pl.col("row")).alias(
            "instruction"
        ),
        "completions",
    )
    df.write_parquet(path)


def real_record(i: int) -> dict:
    """One record in the real openbmb/UltraFeedback layout (all its keys)."""

    def comp(model: str, response: str, overall: float, rating: str) -> dict:
        aspect = {"Rating": rating, "Rationale": "..."}
        return {
            "annotations": {
                "helpfulness": {**aspect, "Type": ["1", "2"], "Rationale For Rating": "..."},
                "honesty": aspect,
                "instruction_following": aspect,
                "truthfulness": {**aspect, "Type": ["0"], "Rationale For Rating": "..."},
            },
            "critique": "Good.",
            "custom_system_prompt": "You are a helpful assistant.",
            "fine-grained_score": 4.25,
            "model": model,
            "overall_score": overall,
            "principle": "helpfulness",
            "response": response,
        }

    return {
        "source": "evol_instruct",
        "instruction": f"Question {i}?",
        "models": ["gpt-4", "llama-2-70b-chat", "ultralm-65b", "starchat"],
        "completions": [
            comp("gpt-4", f"Answer {i} by gpt-4.", 8.5, "5"),
            comp("llama-2-70b-chat", f"Answer {i} by llama.", 6.0, "4"),
            comp("ultralm-65b", f"Answer {i} by ultralm.", 7.0, "N/A"),
            comp("starchat", f"Answer {i} by starchat.", 3.0, "2"),
        ],
        "correct_answers": ["None"],
        "incorrect_answers": ["None"],
    }


# --------------------------------------------------------------------------- H4's schema
def h4_features() -> Any:
    """The features of ``HuggingFaceH4/ultrafeedback_binarized`` (every split), written by hand
    from its dataset card (``dataset_info.features``): ``prompt``, ``prompt_id`` (string),
    ``chosen``, ``rejected``, ``messages`` (lists of ``{content, role}`` strings, in that field
    order), ``score_chosen``, ``score_rejected`` (float64)."""
    import datasets

    messages = datasets.List(
        {"content": datasets.Value("string"), "role": datasets.Value("string")}
    )
    return datasets.Features(
        {
            "prompt": datasets.Value("string"),
            "prompt_id": datasets.Value("string"),
            "chosen": messages,
            "rejected": messages,
            "messages": messages,
            "score_chosen": datasets.Value("float64"),
            "score_rejected": datasets.Value("float64"),
        }
    )


def h4_dataset(n: int = 4) -> Any:
    """``n`` rows in H4's schema (``prompt_id`` = sha256 of the prompt, as H4's)."""
    import hashlib

    import datasets

    rows = []
    for i in range(n):
        prompt = f"write the sum of one plus {WORDS[50 + i % 10]}"
        good, bad = f"the answer is {WORDS[51 + i % 9]}", "the moon is a planet"
        user = {"content": prompt, "role": "user"}
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
                "chosen": [user, {"content": good, "role": "assistant"}],
                "rejected": [user, {"content": bad, "role": "assistant"}],
                "messages": [user, {"content": good, "role": "assistant"}],
                "score_chosen": 8.0,
                "score_rejected": 3.5,
            }
        )
    return datasets.Dataset.from_list(rows, features=h4_features())


def run_karma(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``karma <argv>`` in-process: (exit code, stdout, stderr); root logging restored after."""
    from karma.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    capsys.readouterr()
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:  # the CLI points logging at the captured stderr; restore it
        root.handlers[:], root.level = saved
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def error_line(code: int, err: str, *, logs_before: bool = False) -> str:
    """The CLI error contract: exit 1, one ``karma: error:`` line, last, no traceback; returns
    the message. With ``logs_before`` the stage may have logged (INFO lines) before it failed."""
    assert code == 1, err
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("karma: error: ")]
    assert errors == lines[-1:], err
    assert logs_before or len(lines) == 1, err
    return lines[-1].removeprefix("karma: error: ")


def one_error_line(err: str) -> str:
    """stderr is exactly one ``karma: error: ...`` line (returned whole) and no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("karma: error: "), err
    assert "Traceback" not in err, err
    return lines[0]
