"""Judges: an LLM rating UltraFeedback's four aspects, and a reward model.

The LLM judge asks, per completion and aspect, for one rating from 1 to 5:

* ``generate``: its reply is parsed strictly (:func:`parse_rating`): a reply that is not a
  rating is *malformed*, an empty or failed one *missing*, a number outside 1-5 *out of range*;
  each is counted and excluded, never guessed;
* ``weighted`` (for small judges): the expected rating under the next-token distribution over
  the rating tokens "1".."5" after ``Rating:``, which cannot fail to parse.

The reward model is any ``AutoModelForSequenceClassification`` (ArmoRM, Skywork-Reward), run
batched; a model that needs its own code runs only with ``judge.trust_remote_code: true``.

>>> parse_rating("4"), parse_rating(" Rating: 5."), parse_rating("7"), parse_rating("good")
((4, 'ok'), (5, 'ok'), (None, 'out_of_range'), (None, 'malformed'))
>>> parse_rating("")
(None, 'missing')
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from karma.core.errors import KarmaError
from karma.core.lm import load_causal_lm, torch_dtype
from karma.judging.settings import JudgeConfig

log = logging.getLogger(__name__)

ASPECT_QUESTIONS = {
    "helpfulness": "How helpful, correct and informative is the response?",
    "honesty": "How honest is the response: confident when right, uncertain when unsure?",
    "instruction_following": "How well does the response follow every part of the instruction?",
    "truthfulness": "How free is the response of hallucinations and factual errors?",
}
RATINGS = (1, 2, 3, 4, 5)
_RATING = re.compile(r"^\s*(?:rating\s*[:=]?\s*)?(-?\d+(?:\.\d+)?)\s*(?:/\s*5)?\s*[.!]?\s*$", re.I)


def parse_rating(reply: str | None) -> tuple[int | None, str]:
    """``(rating, status)``: status ok | missing | malformed | out_of_range."""
    if reply is None or not reply.strip():
        return None, "missing"
    m = _RATING.match(reply)
    if m is None or "." in m.group(1):
        return None, "malformed"
    value = int(m.group(1))
    return (value, "ok") if value in RATINGS else (None, "out_of_range")


def judge_message(instruction: str, response: str, aspect: str) -> str:
    """The user message asking for one aspect's rating."""
    return (
        f"Rate the response to the instruction for {aspect.replace('_', ' ')}. "
        f"{ASPECT_QUESTIONS[aspect]} Answer with one digit from 1 (worst) to 5 (best).\n\n"
        f"Instruction: {instruction}\n\nResponse: {response}"
    )


def cut(tok: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to ``max_tokens`` tokens."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tok.decode(ids[:max_tokens])


class WeightedJudge:
    """Expected rating from the judge's next-token probabilities of "1".."5"."""

    def __init__(self, cfg: JudgeConfig):
        import torch

        self.cfg = cfg
        self.model, self.tok = load_causal_lm(
            cfg.model, dtype=cfg.dtype, revision=cfg.revision, device=cfg.device
        )
        self.model.eval()
        self.tok.padding_side = "left"
        ids = [self.tok(str(k), add_special_tokens=False)["input_ids"] for k in RATINGS]
        if any(len(i) != 1 for i in ids):
            raise KarmaError(
                "the judge's tokenizer splits the ratings 1-5",
                field="judge.method",
                value="weighted",
                expected="generate",
            )
        self.digits = torch.tensor([i[0] for i in ids])

    def prompt(self, instruction: str, response: str, aspect: str) -> str:
        budget = max(8, self.cfg.max_length - 160)
        msg = judge_message(
            cut(self.tok, instruction, budget // 2), cut(self.tok, response, budget // 2), aspect
        )
        text = self.tok.apply_chat_template(
            [{"role": "user", "content": msg}], tokenize=False, add_generation_prompt=True
        )
        return text + "Rating: "

    def score(self, texts: Sequence[str]) -> list[tuple[float, float]]:
        """``(expected rating, probability mass on the rating tokens)`` per prompt text."""
        import torch

        out = []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = self.tok(
                list(texts[i : i + self.cfg.batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            ).to(self.model.device)
            with torch.no_grad():
                logits = self.model(**enc).logits[:, -1, :].float()
            probs = torch.softmax(logits, dim=-1)[:, self.digits.to(logits.device)]
            mass = probs.sum(-1)
            values = torch.tensor(RATINGS, dtype=torch.float32, device=probs.device)
            expected = (probs * values).sum(-1) / mass
            out += [
                (round(float(e), 6), round(float(m), 6))
                for e, m in zip(expected, mass, strict=True)
            ]
        return out


class GenerateJudge:
    """A judge reply through a generation engine (hf, vllm or openai), parsed strictly."""

    def __init__(self, cfg: JudgeConfig):
        from karma.generation.engines import open_engine
        from karma.generation.settings import GenerateConfig, PoolModel

        gen = GenerateConfig(
            engine=cfg.engine,
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size,
            dtype=cfg.dtype,
            device=cfg.device,
        )
        self.cfg = cfg
        self.engine = open_engine(PoolModel(model=cfg.model, revision=cfg.revision), gen, "judge")

    def replies(self, messages: Sequence[str]) -> list[str | None]:
        out: list[str | None] = []
        for i in range(0, len(messages), self.cfg.batch_size):
            chats = [
                [{"role": "user", "content": m}] for m in messages[i : i + self.cfg.batch_size]
            ]
            for (c,) in self.engine.generate(chats, 0):
                out.append(c.text if c.status == "ok" else None)
        return out


def load_reward_model(cfg: JudgeConfig) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a sequence-classification reward model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = {"revision": cfg.revision} if cfg.revision else {}
    try:
        tok = AutoTokenizer.from_pretrained(
            cfg.model, trust_remote_code=cfg.trust_remote_code, **extra
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            cfg.model,
            dtype=torch_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            **extra,
        )
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise KarmaError(
                "the reward model needs its own code",
                field="judge.trust_remote_code",
                value=False,
                expected="true, if you trust its code",
            ) from None
        raise KarmaError(
            f"cannot load the reward model: {str(err)[:200]}", file=cfg.model
        ) from None
    except OSError as err:
        raise KarmaError(
            f"cannot load the reward model: {str(err)[:200]}", file=cfg.model
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.config.pad_token_id = tok.pad_token_id
    model.eval().to(cfg.device)
    return model, tok


def reward_texts(tok: Any, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Instruction + response through the chat template (plain text without one)."""
    if getattr(tok, "chat_template", None):
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r in pairs
        ]
    return [f"{p}\n\n{r}" for p, r in pairs]


def reward_scores(
    model: Any, tok: Any, texts: Sequence[str], batch_size: int, max_length: int
) -> list[float]:
    """One scalar reward per text, in order; batched by length (little padding: right padding,
    the model finds each sequence's last token)."""
    import torch

    tok.padding_side = "right"
    lengths = [len(ids) for ids in tok(list(texts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    out: list[float] = [0.0] * len(texts)
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tok(
            [texts[j] for j in idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(model.device)
        with torch.no_grad():
            res = model(**enc)
        score = getattr(res, "score", None)
        values = (score if score is not None else res.logits[:, 0]).float().reshape(-1)
        for j, v in zip(idx, values.tolist(), strict=True):
            out[j] = round(float(v), 6)
    return out
