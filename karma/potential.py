"""MAP: select preference pairs by alignment potential (Huang et al., ICML 2025, arXiv 2503.01864).

A pair is most useful when the annotation says chosen is much better (large *explicit* margin) and
the model does not yet separate the two responses (small *implicit* margin)::

    map = z(explicit margin) - beta * z(|implicit margin|)

The top ``ratio`` of pairs by the method's score are kept.

Matched against the authors' code (Hesse73/Alignment-Potential-Metric):

* ``metric_selection.py::get_top_score_idx``: z-scores use the population std (``np.std``, ddof=0)
  over the whole dataset; ``rm-xlogp`` = ``z(rm_margin) - logp_weight * z(logp_margin_norm_abs)``
  (our ``map`` with ``beta``); ``rm_margin`` ranks by ``z(rm_margin)`` (our ``explicit``);
  ``logp_margin_norm_abs`` ranks by ``-z(|logp margin|)`` ("negative logp margin is better",
  our ``implicit``); ``rand`` is a seeded random choice (our ``random``); the number kept is
  ``int(select_ratio * len(ds))`` (floor) and the top-k are the k largest scores.
* ``cal_logps.py::cal_logp`` and ``infer_scripts/infer_dataset.py::logp_margin``: the implicit
  margin is ``chosen_logps_norm - rejected_logps_norm`` where ``*_norm`` is the *mean* log-prob of
  the response tokens given the chat-templated prompt (SimPO-style, no reference model).

Deliberate differences: ties are broken by row order (earlier row first) instead of
``np.argsort``'s unspecified order; a margin with zero spread gets z = 0 (the authors' code gives
NaN); the response starts after the prompt rendered *with* the generation prompt, so the
assistant header is context, not scored (``cal_logp`` scores it as part of the response).

Example::

    >>> import polars as pl
    >>> from karma.potential import top_k, zscore
    >>> zscore([1.0, 2.0, 3.0]).round(4).tolist()
    [-1.2247, 0.0, 1.2247]
    >>> rank, kept = top_k([0.5, 2.0, 0.5, -1.0], ratio=0.5)
    >>> rank.tolist(), kept.tolist()
    ([2, 1, 3, 4], [True, True, False, False])
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from karma.errors import KarmaError
from karma.io import atomic_path, write_json

log = logging.getLogger(__name__)

Method = Literal["none", "map", "explicit", "implicit", "random"]
ExplicitSource = Literal["s_pref_gap", "rating_gap"]
METHODS: tuple[str, ...] = ("none", "map", "explicit", "implicit", "random")
EXPLICIT_SOURCES: tuple[str, ...] = ("s_pref_gap", "rating_gap")
WHERE = "params.yaml:select"
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = ".cache/karma/margins"

#: Columns appended to the preference schema, in order.
SCORE_COLUMNS: dict[str, Any] = {
    "margin_explicit": pl.Float64,
    "logp_chosen": pl.Float64,
    "logp_rejected": pl.Float64,
    "n_tokens_chosen": pl.Int64,
    "n_tokens_rejected": pl.Int64,
    "margin_implicit": pl.Float64,
    "z_explicit": pl.Float64,
    "z_implicit_abs": pl.Float64,
    "map_score": pl.Float64,
    "score": pl.Float64,
    "rank": pl.Int64,
    "kept": pl.Boolean,
}


@dataclass
class SelectConfig:
    """The ``select`` params section.

    method: ``none`` keeps every pair and loads no model; ``map`` ranks by
        ``z(explicit) - beta * z(|implicit|)``; ``explicit`` by ``z(explicit)``; ``implicit`` by
        ``-z(|implicit|)``; ``random`` by a uniform draw seeded with the top-level ``seed``.
    ratio: fraction of pairs kept, in (0, 1]; ``floor(ratio * n)`` pairs, at least one.
    beta: weight of the implicit term in ``map``.
    explicit: ``s_pref_gap`` (KARMA's S_pref of chosen minus rejected model) or ``rating_gap``
        (instance ratings, chosen minus rejected).
    batch_size: sequences per forward pass of the scorer.
    max_tokens: padded tokens per forward pass (caps memory for long sequences).
    max_length: longest scored sequence (prompt + response, tokens); longer ones are truncated.
    cache: reuse implicit margins cached by model hash + data hash.
    """

    method: Method = "none"
    ratio: float = 0.4
    beta: float = 1.0
    explicit: ExplicitSource = "s_pref_gap"
    batch_size: int = 8
    max_tokens: int = 8192
    max_length: int = 2048
    cache: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise KarmaError(
                "unknown method",
                file=WHERE,
                field="method",
                value=self.method,
                expected=" | ".join(METHODS),
            )
        if self.explicit not in EXPLICIT_SOURCES:
            raise KarmaError(
                "unknown explicit margin",
                file=WHERE,
                field="explicit",
                value=self.explicit,
                expected=" | ".join(EXPLICIT_SOURCES),
            )
        if not (isinstance(self.ratio, (int, float)) and 0.0 < self.ratio <= 1.0):
            raise KarmaError(
                "out of range",
                file=WHERE,
                field="ratio",
                value=self.ratio,
                expected="0 < ratio <= 1",
            )
        if not (
            isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta >= 0
        ):
            raise KarmaError(
                "out of range", file=WHERE, field="beta", value=self.beta, expected="finite, >= 0"
            )
        for name, low in (("batch_size", 1), ("max_tokens", 16), ("max_length", 8)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise KarmaError(
                    "out of range", file=WHERE, field=name, value=value, expected=f"int >= {low}"
                )


# --------------------------------------------------------------------------- scores (numpy)


def zscore(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` with the population std (ddof=0), as the authors' code.

    A constant column carries no ranking information and gets z = 0 everywhere; "constant"
    includes a spread at float-noise level (std <= 1e-12 * max(1, |mean|)), which would otherwise
    blow noise up to unit scale.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    if not np.all(np.isfinite(x)):
        raise KarmaError("cannot z-score non-finite margins", value=int(np.sum(~np.isfinite(x))))
    std = float(x.std())
    if not math.isfinite(std) or std <= 1e-12 * max(1.0, abs(float(x.mean()))):
        return np.zeros_like(x)
    return (x - x.mean()) / std


def n_keep(n: int, ratio: float) -> int:
    """Pairs kept: ``floor(ratio * n)`` (the authors' ``int(select_ratio * len(ds))``).

    A tiny epsilon absorbs binary-float noise (``0.29 * 100 = 28.999999999999996`` keeps 29).
    Raises :class:`KarmaError` when that keeps no pair.
    """
    if not 0.0 < ratio <= 1.0:
        raise KarmaError("out of range", field="ratio", value=ratio, expected="0 < ratio <= 1")
    k = min(n, math.floor(ratio * n + 1e-9))
    if k < 1:
        need = f"ratio >= 1/{n} = {1 / n:.4g}" if n else "a non-empty preference dataset"
        raise KarmaError(
            f"keeps zero of {n} pairs", file=WHERE, field="ratio", value=ratio, expected=need
        )
    return k


def top_k(scores: Sequence[float] | np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Rank by score, highest first (1-based); ties go to the earlier row. Keep the top ``ratio``.

    Returns ``(rank, kept)`` aligned with ``scores``.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size and not np.all(np.isfinite(s)):
        raise KarmaError("cannot rank non-finite scores", value=int(np.sum(~np.isfinite(s))))
    k = n_keep(s.size, ratio)
    order = np.lexsort((np.arange(s.size), -s))  # primary: score desc; secondary: row asc
    rank = np.empty(s.size, dtype=np.int64)
    rank[order] = np.arange(1, s.size + 1)
    return rank, rank <= k


def method_scores(
    method: str,
    explicit: np.ndarray | None,
    implicit: np.ndarray | None,
    *,
    beta: float = 1.0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Z-scores, the MAP score and the ranking ``score`` of ``method`` (not for ``none``).

    ``implicit`` is the signed implicit margin; its absolute value is z-scored.
    """
    if method not in METHODS or method == "none":
        raise KarmaError(
            "no ranking score",
            field="method",
            value=method,
            expected="map | explicit | implicit | random",
        )
    out: dict[str, np.ndarray] = {}
    if explicit is not None:
        out["z_explicit"] = zscore(explicit)
    if implicit is not None:
        out["z_implicit_abs"] = zscore(np.abs(np.asarray(implicit, dtype=np.float64)))
    if "z_explicit" in out and "z_implicit_abs" in out:
        out["map_score"] = out["z_explicit"] - beta * out["z_implicit_abs"]
    need = {"map": "map_score", "explicit": "z_explicit", "implicit": "z_implicit_abs"}
    if method in need and need[method] not in out:
        raise KarmaError(f"method {method!r} needs margins that were not computed", field="method")
    if method == "map":
        out["score"] = out["map_score"].copy()
    elif method == "explicit":
        out["score"] = out["z_explicit"].copy()
    elif method == "implicit":
        out["score"] = -out["z_implicit_abs"]
    else:  # random
        n = len(explicit) if explicit is not None else len(implicit)  # type: ignore[arg-type]
        out["score"] = np.random.default_rng(seed).random(n)
    return out


# --------------------------------------------------------------------------- explicit margins


def explicit_margins(
    pairs: pl.DataFrame, source: str, *, file: object = "pairs", required: bool = True
) -> np.ndarray | None:
    """Explicit margin per pair: ``s_pref_chosen - s_pref_rejected`` or the rating gap.

    Rounded to 12 decimals so gaps that are equal on paper (0.3 - 0.1 vs 0.4 - 0.2) tie exactly
    and their order is decided by the row-order tie-break, not by float noise.
    With ``required=False`` a missing source gives ``None`` instead of an error.
    """
    cols = {
        "s_pref_gap": ("s_pref_chosen", "s_pref_rejected"),
        "rating_gap": ("chosen_rating", "rejected_rating"),
    }
    if source not in cols:
        raise KarmaError(
            "unknown explicit margin",
            file=WHERE,
            field="explicit",
            value=source,
            expected=" | ".join(EXPLICIT_SOURCES),
        )
    hint = (
        "instance ratings (an UltraFeedback-style dataset with ratings), or select.explicit: "
        "s_pref_gap"
        if source == "rating_gap"
        else "the preferences stage's S_pref columns"
    )
    for col in cols[source]:
        if col not in pairs.columns:
            if not required:
                return None
            raise KarmaError(f"column missing; {source} needs {hint}", file=file, field=col)
        nulls = pairs[col].null_count()
        if nulls:
            if not required:
                return None
            raise KarmaError(
                f"{nulls} of {pairs.height} pairs have no value; {source} needs {hint}",
                file=file,
                field=col,
            )
    a, b = cols[source]
    try:
        gap = (pairs[a].cast(pl.Float64) - pairs[b].cast(pl.Float64)).to_numpy()
    except pl.exceptions.PolarsError as err:
        raise KarmaError(f"not numeric: {err}", file=file, field=a) from None
    return np.ascontiguousarray(np.round(gap, 12), dtype=np.float64)


# --------------------------------------------------------------------------- implicit margins


def _messages(value: Any, *, file: object, field: str, row: int) -> list[dict[str, str]]:
    """A conversational column value as a list of ``{"role", "content"}`` dicts."""
    if isinstance(value, str):
        return [{"role": "assistant" if field != "prompt" else "user", "content": value}]
    if not isinstance(value, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        raise KarmaError(
            "not a conversational message list",
            file=file,
            field=f"{field}[{row}]",
            value=str(value)[:80],
            expected='[{"role": ..., "content": ...}]',
        )
    return [{"role": str(m.get("role") or "user"), "content": m["content"]} for m in value]


def encode_sequence(
    tokenizer: Any,
    prompt: list[dict[str, str]],
    response: list[dict[str, str]],
    *,
    max_length: int = 2048,
) -> tuple[list[int], int]:
    """Token ids of the chat ``prompt + response`` and where the response starts.

    The prompt is rendered with ``add_generation_prompt=True`` and the full conversation without;
    the response tokens are those after the longest common prefix of the two token lists (robust
    to a merge across the boundary). Sequences over ``max_length`` keep the end of the prompt
    (at least half the budget when the response is long) and the start of the response.
    """
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
    full_ids = list(tokenizer(full_text, add_special_tokens=False)["input_ids"])
    start = 0
    for a, b in zip(prompt_ids, full_ids, strict=False):
        if a != b:
            break
        start += 1
    if start == 0 or start >= len(full_ids):
        raise KarmaError(
            "chat template gives no response tokens after the prompt",
            value=full_text[-80:],
            expected="a template whose full chat extends the prompt with generation prompt",
        )
    if len(full_ids) > max_length:
        n_resp = len(full_ids) - start
        keep_prompt = min(start, max(max_length - n_resp, max_length // 2))
        full_ids = full_ids[start - keep_prompt : start] + full_ids[start:]
        full_ids = full_ids[:max_length]
        start = keep_prompt
    return full_ids, start


def _batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by length (longest first) into batches under both caps."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # longest of the batch comes first
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * width > max_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def _batch_logps(
    model: Any,
    seqs: list[tuple[list[int], int]],
    *,
    pad_id: int,
    device: Any,
    head: str,
    chunk: int = 2048,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and response token counts of right-padded ``seqs``.

    ``head="hidden"`` runs the decoder once and applies the LM head only at response positions
    (in chunks, so memory stays bounded); ``head="full"`` takes the model's full logits.
    No attention mask is passed: with right padding a causal model's real positions never attend
    to the pads after them (and position ids count from 0 as unpadded), so their outputs equal the
    unpadded ones, and SDPA keeps its causal fast path instead of materialising a padding mask.
    """
    import torch
    import torch.nn.functional as F

    width = max(len(ids) for ids, _ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    rows, pos = [], []
    for r, (ids, start) in enumerate(seqs):
        input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        rows.append(torch.full((len(ids) - start,), r, dtype=torch.long))
        pos.append(torch.arange(start - 1, len(ids) - 1, dtype=torch.long))
    row = torch.cat(rows)
    p = torch.cat(pos)
    targets = input_ids[row, p + 1].to(device)
    input_ids = input_ids.to(device)
    if head == "hidden":
        hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
        h = hidden[row.to(device), p.to(device)]
        lm_head = model.get_output_embeddings()
        parts = []
        for s in range(0, h.shape[0], chunk):
            logits = lm_head(h[s : s + chunk]).float()
            parts.append(-F.cross_entropy(logits, targets[s : s + chunk], reduction="none"))
        token_lp = torch.cat(parts)
    else:
        logits = model(input_ids=input_ids, use_cache=False).logits
        sel = logits[row.to(device), p.to(device)].float()
        token_lp = -F.cross_entropy(sel, targets, reduction="none")
    token_lp = token_lp.double().cpu().numpy()
    counts = np.bincount(row.numpy(), minlength=n)
    sums = np.bincount(row.numpy(), weights=token_lp, minlength=n)
    return sums, counts


def sequence_logps(
    model: Any,
    seqs: list[tuple[list[int], int]],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_tokens: int = 8192,
    progress: bool = True,
    desc: str = "scoring",
) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs and token counts for many ``(ids, response_start)`` sequences.

    Length-sorted batches (longest first, so memory trouble shows at once), right padding,
    ``torch.inference_mode``. Two of the shortest sequences check the fast path (LM head applied
    only at response positions) against the model's own logits; when they differ (models that
    post-process logits) every batch uses the full logits.
    """
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sums = np.zeros(len(seqs), dtype=np.float64)
    counts = np.zeros(len(seqs), dtype=np.int64)
    batches = _batches([len(ids) for ids, _ in seqs], batch_size, max_tokens)
    head = (
        "hidden"
        if hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")
        else "full"
    )
    n_tokens = sum(len(ids) for ids, _ in seqs)
    bar = tqdm(total=n_tokens, desc=desc, unit="tok", disable=not progress, leave=False)
    with torch.inference_mode():
        if head == "hidden" and seqs:  # check the fast path on the (cheap) shortest batch
            check = [seqs[i] for i in batches[-1][-2:]]
            try:
                s_fast, _ = _batch_logps(model, check, pad_id=pad_id, device=device, head="hidden")
            except (AttributeError, TypeError, NotImplementedError) as err:
                log.debug("fast LM-head path unavailable (%s); using full logits", err)
                s_fast = None
            s_full, _ = _batch_logps(model, check, pad_id=pad_id, device=device, head="full")
            if s_fast is None or not np.allclose(s_fast, s_full, rtol=1e-4, atol=1e-3):
                if s_fast is not None:
                    log.warning("decoder+LM-head scores differ from model logits; using logits")
                head = "full"
        for idx in batches:
            batch = [seqs[i] for i in idx]
            s, c = _batch_logps(model, batch, pad_id=pad_id, device=device, head=head)
            sums[idx] = s
            counts[idx] = c
            bar.update(sum(len(ids) for ids, _ in batch))
    bar.close()
    return sums, counts


def directory_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 over the relative names and bytes of every file under ``path`` (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def data_hash(pairs: pl.DataFrame) -> str:
    """SHA-256 of the ``prompt``/``chosen``/``rejected`` columns, in row order."""
    h = hashlib.sha256()
    for col in ("prompt", "chosen", "rejected"):
        h.update(col.encode())
        for value in pairs[col].to_list():
            h.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


def load_model(path: str | os.PathLike[str], *, device: str = "auto") -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local directory (float32 on CPU, bf16 on CUDA)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise KarmaError(
            "not a model directory (no config.json)",
            file=p,
            expected="a directory written by save_pretrained, e.g. models/base",
        )
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(p))
    if not getattr(tokenizer, "chat_template", None):
        raise KarmaError("tokenizer has no chat template", file=p, field="chat_template")
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    model.to(device).eval()
    return model, tokenizer


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def _score_model(
    pairs: pl.DataFrame,
    model_dir: str | os.PathLike[str],
    *,
    file: object,
    config: SelectConfig,
    device: str,
    progress: bool,
    desc: str,
) -> dict[str, np.ndarray]:
    """Summed log-probs and counts of chosen and rejected responses under one model."""
    model, tokenizer = load_model(model_dir, device=device)
    seqs: list[tuple[list[int], int]] = []
    n_truncated = 0
    for i, (p, c, r) in enumerate(
        zip(
            pairs["prompt"].to_list(),
            pairs["chosen"].to_list(),
            pairs["rejected"].to_list(),
            strict=True,
        )
    ):
        pm = _messages(p, file=file, field="prompt", row=i)
        for field, resp in (("chosen", c), ("rejected", r)):
            rm = _messages(resp, file=file, field=field, row=i)
            try:
                ids, start = encode_sequence(tokenizer, pm, rm, max_length=config.max_length)
            except KarmaError as err:
                raise KarmaError(f"row {i}: {err}", file=file, field=field) from None
            n_truncated += len(ids) == config.max_length
            seqs.append((ids, start))
    if n_truncated:
        log.warning("%d sequences reached max_length=%d tokens", n_truncated, config.max_length)
    sums, counts = sequence_logps(
        model,
        seqs,
        pad_id=_pad_id(tokenizer),
        batch_size=config.batch_size,
        max_tokens=config.max_tokens,
        progress=progress,
        desc=desc,
    )
    return {
        "sum_chosen": sums[0::2],
        "sum_rejected": sums[1::2],
        "n_chosen": counts[0::2],
        "n_rejected": counts[1::2],
    }


def implicit_margins(
    pairs: pl.DataFrame,
    model_dir: str | os.PathLike[str],
    *,
    reference_dir: str | os.PathLike[str] | None = None,
    dpo_beta: float = 0.1,
    config: SelectConfig | None = None,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,
    device: str = "auto",
    progress: bool = True,
    file: object = "pairs",
) -> pl.DataFrame:
    """Implicit margins of every pair under the model in ``model_dir``.

    Without a reference (SimPO-style): ``margin_implicit = mean logp(chosen) - mean logp(rejected)``
    over response tokens. With ``reference_dir`` (the model is then the trained policy), the DPO
    form ``dpo_beta * ((sum logp_pi - sum logp_ref)(chosen) - (same)(rejected))``.

    Returns columns ``logp_chosen``, ``logp_rejected`` (token-averaged, under the model),
    ``n_tokens_chosen``, ``n_tokens_rejected``, ``margin_implicit``. Results are cached under
    ``cache_dir`` keyed by the model (and reference) directory hash, the data hash and the scoring
    settings (see :func:`cache_key`); ``cache_dir=None`` or ``config.cache=False`` disables it.
    """
    config = config or SelectConfig()
    for col in ("prompt", "chosen", "rejected"):
        if col not in pairs.columns:
            raise KarmaError(
                "column missing", file=file, field=col, expected="TRL preference format"
            )
    key = cache_key(pairs, model_dir, reference_dir=reference_dir, config=config, device=device)
    cached = _cache_read(cache_dir, key) if cache_dir is not None and config.cache else None
    if cached is not None and cached.height == pairs.height:
        log.info("implicit margins: cache hit %s", key[:12])
        raw = {c: cached[c].to_numpy() for c in cached.columns}
    else:
        raw = _score_model(
            pairs,
            model_dir,
            file=file,
            config=config,
            device=device,
            progress=progress,
            desc="implicit margins",
        )
        if reference_dir is not None:
            ref = _score_model(
                pairs,
                reference_dir,
                file=file,
                config=config,
                device=device,
                progress=progress,
                desc="reference log-probs",
            )
            raw["ref_sum_chosen"] = ref["sum_chosen"]
            raw["ref_sum_rejected"] = ref["sum_rejected"]
        if cache_dir is not None and config.cache:
            _cache_write(cache_dir, key, pl.DataFrame(raw))
    n_c = raw["n_chosen"].astype(np.int64)
    n_r = raw["n_rejected"].astype(np.int64)
    mean_c = raw["sum_chosen"] / n_c
    mean_r = raw["sum_rejected"] / n_r
    if reference_dir is not None:
        margin = dpo_beta * (
            (raw["sum_chosen"] - raw["ref_sum_chosen"])
            - (raw["sum_rejected"] - raw["ref_sum_rejected"])
        )
    else:
        margin = mean_c - mean_r
    return pl.DataFrame(
        {
            "logp_chosen": mean_c,
            "logp_rejected": mean_r,
            "n_tokens_chosen": n_c,
            "n_tokens_rejected": n_r,
            "margin_implicit": margin,
        },
        schema={
            k: SCORE_COLUMNS[k]
            for k in SCORE_COLUMNS
            if k
            in {
                "logp_chosen",
                "logp_rejected",
                "n_tokens_chosen",
                "n_tokens_rejected",
                "margin_implicit",
            }
        },
    )


def cache_key(
    pairs: pl.DataFrame,
    model_dir: str | os.PathLike[str],
    *,
    reference_dir: str | os.PathLike[str] | None = None,
    config: SelectConfig | None = None,
    device: str = "auto",
) -> str:
    """Cache key: model (+ reference) directory hash, data hash, scoring settings."""
    config = config or SelectConfig()
    parts = {
        "version": CACHE_VERSION,
        "model": directory_hash(model_dir),
        "reference": directory_hash(reference_dir) if reference_dir is not None else None,
        "data": data_hash(pairs),
        "batch_size": config.batch_size,
        "max_tokens": config.max_tokens,
        "max_length": config.max_length,
        "device": device,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cache_read(cache_dir: str | os.PathLike[str], key: str) -> pl.DataFrame | None:
    path = Path(cache_dir) / f"{key}.parquet"
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except Exception as err:  # a corrupt cache entry is recomputed, never fatal
        log.warning("ignoring unreadable cache entry %s (%s)", path, err)
        return None


def _cache_write(cache_dir: str | os.PathLike[str], key: str, frame: pl.DataFrame) -> None:
    try:
        with atomic_path(Path(cache_dir) / f"{key}.parquet") as tmp:
            frame.write_parquet(tmp)
    except OSError as err:  # a read-only cache dir must not fail the run
        log.warning("could not write margin cache in %s (%s)", cache_dir, err)


# --------------------------------------------------------------------------- selection


def select(
    pairs: pl.DataFrame,
    config: SelectConfig,
    *,
    seed: int = 0,
    implicit: pl.DataFrame | None = None,
    file: object = "pairs",
) -> pl.DataFrame:
    """Every pair with its margins, z-scores, scores, ``rank`` (1 = best) and ``kept`` flag.

    ``implicit`` is :func:`implicit_margins`' frame (row-aligned with ``pairs``); required unless
    ``config.method == "none"``, which keeps every pair in input order.
    """
    n = pairs.height
    clash = [c for c in SCORE_COLUMNS if c in pairs.columns]
    if clash:
        raise KarmaError("already has score columns", file=file, field=clash[0])
    cols: dict[str, Any] = {c: None for c in SCORE_COLUMNS}
    if config.method == "none":
        cols["margin_explicit"] = explicit_margins(
            pairs, config.explicit, file=file, required=False
        )
        cols["rank"] = np.arange(1, n + 1, dtype=np.int64)
        cols["kept"] = np.ones(n, dtype=bool)
    else:
        explicit = explicit_margins(pairs, config.explicit, file=file)
        if implicit is None or implicit.height != n:
            raise KarmaError(
                f"method {config.method!r} needs implicit margins for all {n} pairs",
                field="implicit",
            )
        imp = implicit["margin_implicit"].to_numpy()
        scores = method_scores(config.method, explicit, imp, beta=config.beta, seed=seed)
        rank, kept = top_k(scores["score"], config.ratio)
        cols.update(scores)
        cols.update({c: implicit[c].to_numpy() for c in implicit.columns if c in SCORE_COLUMNS})
        cols["margin_explicit"] = explicit
        cols["rank"] = rank
        cols["kept"] = kept
    extra = pl.DataFrame(
        [
            pl.Series(c, cols[c] if cols[c] is not None else [None] * n, dtype=t)
            for c, t in SCORE_COLUMNS.items()
        ]
    )
    return pl.concat([pairs, extra], how="horizontal")


def _mean(x: np.ndarray) -> float | None:
    return round(float(np.mean(x)), 6) if x.size else None


def selection_metrics(scored: pl.DataFrame) -> dict[str, Any]:
    """Flat metrics: counts, mean margins of kept vs dropped, explicit-implicit correlations."""
    from scipy import stats

    kept = scored["kept"].to_numpy().astype(bool)
    out: dict[str, Any] = {
        "pairs_in": scored.height,
        "pairs_kept": int(kept.sum()),
        "kept_fraction": round(float(kept.mean()), 6) if scored.height else None,
    }
    series = {
        "explicit_margin": scored["margin_explicit"],
        "implicit_margin": scored["margin_implicit"],
        "implicit_abs": scored["margin_implicit"].abs(),
        "map_score": scored["map_score"],
    }
    for name, s in series.items():
        ok = s.null_count() == 0
        v = s.to_numpy().astype(np.float64) if ok else None
        out[f"{name}_mean_kept"] = _mean(v[kept]) if ok else None
        out[f"{name}_mean_dropped"] = _mean(v[~kept]) if ok else None
    e, i = scored["margin_explicit"], scored["margin_implicit"]
    pearson = spearman = None
    if scored.height >= 2 and e.null_count() == 0 and i.null_count() == 0:
        x, y = e.to_numpy().astype(np.float64), i.to_numpy().astype(np.float64)
        if np.ptp(x) > 0 and np.ptp(y) > 0:
            pearson = round(float(stats.pearsonr(x, y).statistic), 6)
            spearman = round(float(stats.spearmanr(x, y).statistic), 6)
    out["pearson_explicit_implicit"] = pearson
    out["spearman_explicit_implicit"] = spearman
    return out


def plot_margins(
    scored: pl.DataFrame,
    path: str | os.PathLike[str],
    *,
    title: str = "",
    explicit_label: str = "explicit margin",
) -> None:
    """Scatter of explicit vs implicit margin, kept pairs highlighted (deterministic PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    e, i = scored["margin_explicit"], scored["margin_implicit"]
    if scored.height and e.null_count() == 0 and i.null_count() == 0:
        kept = scored["kept"].to_numpy().astype(bool)
        x, y = e.to_numpy(), i.to_numpy()
        ax.scatter(x[~kept], y[~kept], s=14, c="#b0b0b0", label=f"dropped ({int((~kept).sum())})")
        ax.scatter(x[kept], y[kept], s=18, c="#d62728", label=f"kept ({int(kept.sum())})")
        ax.axhline(0.0, color="black", lw=0.6)
        ax.legend(loc="best", fontsize=8)
    else:
        ax.text(
            0.5,
            0.5,
            "no implicit margins (select.method: none)",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set_xlabel(explicit_label)
    ax.set_ylabel("implicit margin (mean logp chosen - rejected)")
    ax.set_title(title or "MAP selection", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)


def read_pairs(path: str | os.PathLike[str]) -> pl.DataFrame:
    """Read the preference parquet, checking the TRL columns are there."""
    p = Path(path)
    if not p.is_file():
        raise KarmaError(
            "preference pairs not found", file=p, expected="the preferences stage's output"
        )
    try:
        pairs = pl.read_parquet(p)
    except Exception as err:
        raise KarmaError(f"not a readable parquet file: {err}", file=p) from None
    for col in ("prompt", "chosen", "rejected"):
        if col not in pairs.columns:
            raise KarmaError(
                "column missing",
                file=p,
                field=col,
                expected="TRL conversational preference format (prompt, chosen, rejected)",
            )
    return pairs


def run_select(
    pairs_path: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: SelectConfig,
    *,
    seed: int = 0,
    metrics_path: str | os.PathLike[str] | None = None,
    plot_path: str | os.PathLike[str] | None = None,
    reference_dir: str | os.PathLike[str] | None = None,
    dpo_beta: float = 0.1,
    cache_dir: str | os.PathLike[str] | None = DEFAULT_CACHE_DIR,
    progress: bool = True,
) -> dict[str, Any]:
    """Read pairs, score, select; write ``out_dir/{pairs,scores}.parquet``, metrics and plot.

    ``pairs.parquet`` holds the kept rows (input order, all score columns); ``scores.parquet``
    every row. Returns the metrics dict.
    """
    pairs = read_pairs(pairs_path)
    if pairs.height == 0:
        raise KarmaError("no preference pairs", file=pairs_path, expected="at least one pair")
    implicit = None
    if config.method != "none":
        explicit_margins(pairs, config.explicit, file=pairs_path)  # fail fast, before the model
        n_keep(pairs.height, config.ratio)
        implicit = implicit_margins(
            pairs,
            model_dir,
            reference_dir=reference_dir,
            dpo_beta=dpo_beta,
            config=config,
            cache_dir=cache_dir,
            progress=progress,
            file=pairs_path,
        )
    scored = select(pairs, config, seed=seed, implicit=implicit, file=pairs_path)
    metrics = selection_metrics(scored)
    out = Path(out_dir)
    with atomic_path(out, is_dir=True) as tmp:
        scored.filter(pl.col("kept")).write_parquet(tmp / "pairs.parquet")
        scored.write_parquet(tmp / "scores.parquet")
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    if plot_path is not None:
        title = f"select.method={config.method} ratio={config.ratio} beta={config.beta}"
        label = f"explicit margin ({config.explicit})"
        plot_margins(scored, plot_path, title=title, explicit_label=label)
    log.info("select: kept %d of %d pairs (%s)", metrics["pairs_kept"], pairs.height, config.method)
    return metrics


def synthetic_pairs(n: int, *, seed: int = 0, ratings: bool = True) -> pl.DataFrame:
    """``n`` random preference pairs in the preferences stage's schema (tests and benchmarks)."""
    import random

    from karma.tiny import _WORDS

    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi))) + rng.choice([".", "?", "!"])

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
