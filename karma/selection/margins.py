"""Implicit margins for MAP: token-averaged log-probabilities of chosen and rejected responses.

The torch half of MAP (the numpy half, z-scores and selection, is :mod:`karma.selection.select`).
Matched against the authors' ``cal_logps.py::cal_logp``: the implicit margin is
``mean logp(chosen) - mean logp(rejected)`` over the response tokens given the chat-templated
prompt (SimPO-style, no reference model); with a reference model, the DPO form.

The response starts after the prompt rendered *with* the generation prompt, so the assistant
header is context, not scored (``cal_logp`` scores it as part of the response). Scores are
cached by model content + data + scoring settings (:func:`cache_key`), so changing
``select.ratio`` or ``select.weight`` does not score the pairs again.

Two forms (``select.implicit_form``): ``logp_mean``, the authors' reference-free gap of mean
log-probs under the current policy, and ``dpo``, ``dpo_beta`` times the gap of summed log-ratios
against a reference model. Pairs that carry stored log-probs of the policy (the columns
:data:`STORED_COLUMNS`, which a generation stage writes for its own samples) get the
``logp_mean`` form from them, without a forward pass (:func:`stored_margins`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from karma.core.errors import KarmaError
from karma.core.io import atomic_file, cache_root, tree_digest
from karma.core.lm import load_causal_lm, pad_id
from karma.selection.settings import SelectConfig

log = logging.getLogger(__name__)

CACHE_VERSION = 2
#: The columns :func:`implicit_margins` returns.
IMPLICIT_COLUMNS: dict[str, Any] = {
    "logp_chosen": pl.Float64,
    "logp_rejected": pl.Float64,
    "n_tokens_chosen": pl.Int64,
    "n_tokens_rejected": pl.Int64,
    "margin_implicit": pl.Float64,
}


#: Stored per-pair log-probs of the policy: mean log-prob of each response (required) and its
#: token count (optional).
STORED_COLUMNS = ("chosen_logp_mean", "rejected_logp_mean")
STORED_COUNTS = ("chosen_n_tokens", "rejected_n_tokens")


def stored_margins(pairs: pl.DataFrame, *, file: object = "pairs") -> pl.DataFrame | None:
    """The ``logp_mean`` implicit margins from stored log-probs, or None when the pairs do not
    carry both :data:`STORED_COLUMNS` (a column with a missing or non-finite value fails).

    >>> pairs = pl.DataFrame({"chosen_logp_mean": [-1.0], "rejected_logp_mean": [-1.5]})
    >>> stored_margins(pairs)["margin_implicit"].to_list()
    [0.5]
    """
    if not all(c in pairs.columns for c in STORED_COLUMNS):
        return None
    values = {}
    for col in STORED_COLUMNS:
        v = pairs[col].cast(pl.Float64, strict=False)
        if v.null_count() or not np.isfinite(v.to_numpy()).all():
            raise KarmaError("stored log-probs must be finite numbers", file=file, field=col,
                             expected="a mean log-prob per response (no nulls)")  # fmt: skip
        values[col] = v.to_numpy()
    counts = [pairs[c].cast(pl.Int64) if c in pairs.columns else pl.Series(c, [None] * pairs.height,
              dtype=pl.Int64) for c in STORED_COUNTS]  # fmt: skip
    chosen, rejected = values[STORED_COLUMNS[0]], values[STORED_COLUMNS[1]]
    return pl.DataFrame(
        {
            "logp_chosen": chosen,
            "logp_rejected": rejected,
            "n_tokens_chosen": counts[0],
            "n_tokens_rejected": counts[1],
            "margin_implicit": chosen - rejected,
        },
        schema=IMPLICIT_COLUMNS,
    )


def load_scorer(path: str | os.PathLike[str], *, device: str = "auto") -> tuple[Any, Any]:
    """``(model, tokenizer)`` for scoring: float32 on CPU, bfloat16 on CUDA, eval mode."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, tokenizer = load_causal_lm(path, dtype=dtype, device=device)
    return model.eval(), tokenizer


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


def data_hash(pairs: pl.DataFrame) -> str:
    """SHA-256 of the ``prompt``/``chosen``/``rejected`` columns, in row order."""
    h = hashlib.sha256()
    for col in ("prompt", "chosen", "rejected"):
        h.update(col.encode())
        for value in pairs[col].to_list():
            h.update(json.dumps(value, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return h.hexdigest()


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
    model, tokenizer = load_scorer(model_dir, device=device)
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
        pad_id=pad_id(tokenizer),
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
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    file: object = "pairs",
) -> pl.DataFrame:
    """Implicit margins of every pair under the model in ``model_dir``.

    Without a reference (SimPO-style): ``margin_implicit = mean logp(chosen) - mean logp(rejected)``
    over response tokens, from the pairs' stored log-probs when they carry them
    (:func:`stored_margins`). With ``reference_dir`` (the model is then the trained policy), the
    DPO form ``dpo_beta * ((sum logp_pi - sum logp_ref)(chosen) - (same)(rejected))``.

    Returns columns ``logp_chosen``, ``logp_rejected`` (token-averaged, under the model),
    ``n_tokens_chosen``, ``n_tokens_rejected``, ``margin_implicit``. Results are cached under
    ``cache_dir`` keyed by the model (and reference) directory hash, the data hash and the scoring
    settings (see :func:`cache_key`) in ``cache_dir`` (default ``cache_root("margins")``);
    ``config.cache=False`` disables the cache.
    """
    config = config or SelectConfig()
    stored = None if reference_dir is not None else stored_margins(pairs, file=file)
    if stored is not None:
        log.info("implicit margins: the pairs' stored log-probs (%s), no forward pass",
                 ", ".join(STORED_COLUMNS))  # fmt: skip
        return stored
    cache_dir = (
        (cache_root("margins") if cache_dir is None else cache_dir) if config.cache else None
    )
    for col in ("prompt", "chosen", "rejected"):
        if col not in pairs.columns:
            raise KarmaError(
                "column missing", file=file, field=col, expected="TRL preference format"
            )
    key = ""
    if cache_dir is not None:
        key = cache_key(pairs, model_dir, reference_dir=reference_dir, config=config, device=device)
    cached = _cache_read(cache_dir, key) if cache_dir is not None else None
    if cached is not None and cached.height == pairs.height:
        log.info("implicit margins: cache hit %s", key[:12])
        raw = {c: cached[c].to_numpy() for c in cached.columns}
    else:
        kw: dict[str, Any] = {"file": file, "config": config, "device": device,
                              "progress": progress}  # fmt: skip
        raw = _score_model(pairs, model_dir, desc="implicit margins", **kw)
        if reference_dir is not None:
            ref = _score_model(pairs, reference_dir, desc="reference log-probs", **kw)
            raw["ref_sum_chosen"] = ref["sum_chosen"]
            raw["ref_sum_rejected"] = ref["sum_rejected"]
        if cache_dir is not None:
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
        schema=IMPLICIT_COLUMNS,
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
        "model": tree_digest(model_dir, memo=True),
        "reference": tree_digest(reference_dir, memo=True) if reference_dir is not None else None,
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
        with atomic_file(Path(cache_dir) / f"{key}.parquet") as tmp:
            frame.write_parquet(tmp)
    except OSError as err:  # a read-only cache dir must not fail the run
        log.warning("could not write margin cache in %s (%s)", cache_dir, err)
