"""The pool: ``scores.measured`` entries, resolved to loadable models.

An entry is a hub id or a local directory, optionally with a chat-template override and a
derivation (the first N decoder layers; Gaussian noise on the weights, seeded). Derived models
are built in memory when they are loaded (seconds for the embedded 135M pool) and saved once to
the cache for lm-eval, keyed by what made them.

>>> from karma.generation.settings import Derive, PoolModel
>>> entry = PoolModel(model="models/base", derive=Derive(layers=16))
>>> describe(entry)
'models/base[layers=16]'
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from karma.core.errors import KarmaError, did_you_mean
from karma.core.io import atomic_file, cache_root, tree_digest
from karma.core.lm import load_causal_lm
from karma.generation.settings import Derive, Mode, PoolModel, as_pool_model

log = logging.getLogger(__name__)


def pool_entry(measured: Mapping[str, Any], name: str | None) -> PoolModel:
    """The pool entry ``name`` of ``scores.measured``; an unknown name says which exist."""
    if not name or name not in measured:
        hint = did_you_mean(name, measured)
        raise KarmaError(
            f"unknown pool model{hint}",
            field="--name",
            value=name,
            expected=f"a name in scores.measured ({', '.join(sorted(measured)) or 'empty'})",
        )
    return as_pool_model(measured[name])


def active(measured: Mapping[str, Any], mode: Mode) -> list[str]:
    """Names of the pool entries benchmarked (and, in pool mode, generating) in ``mode``."""
    return [name for name, e in measured.items() if mode in as_pool_model(e).modes]


def describe(entry: PoolModel) -> str:
    """A short description of what the entry loads."""
    text = entry.model + (f"@{entry.revision}" if entry.revision else "")
    if entry.derive is not None:
        parts = [f"{k}={v}" for k, v in entry.derive.model_dump().items() if v not in (None, 0.0)]
        text += f"[{','.join(parts) or 'copy'}]"
    return text


def identity(entry: PoolModel) -> str:
    """What the model's outputs depend on: weights digest (local) or id@revision, + overrides."""
    local = Path(entry.model)
    source = tree_digest(local, memo=True) if local.is_dir() else f"{entry.model}@{entry.revision}"
    data = {
        "source": source,
        "chat_template": entry.chat_template,
        "derive": entry.derive.model_dump() if entry.derive else None,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def derive_model(model: Any, spec: Derive) -> Any:
    """Apply ``spec`` to ``model`` in place: keep the first layers, add seeded relative noise."""
    import torch

    if spec.layers is not None:
        layers = model.model.layers
        if spec.layers > len(layers):
            raise KarmaError(
                "derive.layers exceeds the model's layers",
                field="derive.layers",
                value=spec.layers,
                expected=f"<= {len(layers)}",
            )
        model.model.layers = torch.nn.ModuleList(list(layers)[: spec.layers])
        model.config.num_hidden_layers = spec.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[: spec.layers]
    if spec.noise > 0:
        gen = torch.Generator().manual_seed(spec.seed)
        with torch.no_grad():
            for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
                if p.ndim < 2:  # norms and biases stay: noise there breaks the model outright
                    continue
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.add_((noise * spec.noise * p.float().std()).to(p.dtype))
    return model


def load_pool_model(
    entry: PoolModel,
    *,
    dtype: str = "float32",
    device: str | None = None,
    where: str = "scores.measured",
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a pool entry, derived and with its chat template."""
    if entry.derive is not None and not Path(entry.model).is_dir():
        raise KarmaError(
            "a derived model needs a local model directory",
            field=f"{where}.model",
            value=entry.model,
            expected="an existing directory",
        )
    model, tok = load_causal_lm(
        entry.model, dtype=dtype, revision=entry.revision, chat_template=False
    )
    if entry.chat_template:
        tok.chat_template = entry.chat_template
    if not getattr(tok, "chat_template", None):
        raise KarmaError(
            "the model has no chat template",
            field=f"{where}.chat_template",
            value=entry.model,
            expected="a Jinja chat template",
        )
    if entry.derive is not None:
        derive_model(model, entry.derive)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tok


def materialize(entry: PoolModel, dtype: str = "float32") -> str:
    """A path or hub id lm-eval can load: the entry itself, or its derived copy in the cache."""
    if entry.derive is None and entry.chat_template is None:
        return entry.model
    target = cache_root("pool", identity(entry) + f"-{dtype}")
    if (target / "config.json").is_file():
        return str(target)
    model, tok = load_pool_model(entry, dtype=dtype)
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    with atomic_file(tmp / "karma.json") as f:
        f.write_text(json.dumps({"source": describe(entry)}) + "\n")
    tmp.rename(target)
    log.info("derived %s saved to %s", describe(entry), target)
    return str(target)
