"""The one causal-LM loader: a model directory (or hub id) -> ``(model, tokenizer)``.

Every stage that loads a model for training, scoring or a check goes through
:func:`load_causal_lm`, so the pad id and the chat-template check are decided once: a tokenizer
without a pad token pads with its end-of-sequence token, and conversational data needs a chat
template (a clear error instead of TRL's late failure).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """``"bfloat16"`` -> ``torch.bfloat16``."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def model_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or KarmaError when it is not a saved model directory."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise KarmaError(
            "not a model directory (no config.json)",
            file=p,
            expected="a directory written by save_pretrained, e.g. models/base",
        )
    return p


#: Provenance file inside model directories the pipeline writes (what made the model).
PROVENANCE = "karma.json"


def provenance(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What made a model directory: its ``karma.json`` (``source``, and for a policy the
    training ``method``, ``seed`` and ``base``), else ``{"source": <path>}``."""
    import json

    p = Path(path) / PROVENANCE
    if p.is_file():
        with contextlib.suppress(ValueError):
            data = json.loads(p.read_text())
            if isinstance(data, dict):
                return data
    return {"source": str(path)}


def write_provenance(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    """Write ``karma.json`` into a model directory (sorted keys: deterministic bytes)."""
    from karma.core.io import write_json

    write_json(Path(path) / PROVENANCE, data)


def pad_id(tokenizer: Any) -> int:
    """The id used for padding: pad, else end-of-sequence, else unknown, else 0."""
    for name in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


def fixed_load_flags(tokenizer: Any) -> Any:
    """``tokenizer`` with how it was loaded recorded as one fixed value.

    transformers writes its load flags into the saved ``tokenizer_config.json``: under
    ``HF_HUB_OFFLINE=1`` (tests, offline machines) ``local_files_only`` becomes ``true``. How a
    tokenizer was loaded is not part of the model, so every saved model (base, policies) gets
    the same bytes offline or not.
    """
    tokenizer.init_kwargs["local_files_only"] = False
    return tokenizer


def load_causal_lm(
    source: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str | None = None,
    revision: str | None = None,
    chat_template: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: a local directory, or a hub id when ``source`` is not one.

    ``chat_template``: require the tokenizer to have one. The tokenizer's pad token (and the
    generation config's pad id) default to its end-of-sequence token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(source).exists() or str(source).startswith((".", "/"))
    where = str(model_dir(source)) if local else str(source)
    extra = {"revision": revision} if revision and not local else {}
    try:
        tokenizer = fixed_load_flags(AutoTokenizer.from_pretrained(where, **extra))
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch_dtype(dtype), **extra)
    except OSError as err:
        msg = " ".join(str(err).split())[:300]
        raise KarmaError(f"cannot load the model: {msg}", file=where) from None
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise KarmaError(
            "tokenizer has no chat template; conversational pairs need one",
            file=where,
            field="chat_template",
            expected="a tokenizer saved with chat_template",
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id(tokenizer)
    if device is not None:
        model.to(device)
    return model, tokenizer
