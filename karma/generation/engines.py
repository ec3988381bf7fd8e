"""Generation engines behind one interface: ``hf`` (here), ``vllm`` and ``openai`` (own modules).

An engine turns a batch of chats into ``n`` :class:`Completion` each: the text, its token count,
the summed and mean token log-probability under the model (what MAP's implicit margin needs),
the finish reason and a status (``ok`` or ``failed``: a failed row is kept and marked, never
dropped). :data:`ENGINES` is the table: adding an engine is one entry and its test.

>>> sorted(ENGINES)
['hf', 'openai', 'vllm']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from karma.generation.completion import Chat, Completion, trim_stop
from karma.generation.settings import GenerateConfig, PoolModel

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What ``generate@<name>`` needs of an engine."""

    name: str
    version: str

    def generate(self, chats: Sequence[Chat], seed: int) -> list[list[Completion]]:
        """``n`` completions for each chat, in order (``seed``: this batch's seed)."""
        ...

    def close(self) -> None:
        """Release the model or connections."""
        ...


class HFEngine:
    """transformers ``generate``, batched with left padding (CPU or GPU)."""

    name = "hf"

    def __init__(self, entry: PoolModel, cfg: GenerateConfig, where: str = "scores.measured"):
        import torch
        import transformers

        from karma.generation.pool import load_pool_model

        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        self.model, self.tok = load_pool_model(
            entry, dtype=cfg.dtype, device=cfg.device, where=where
        )
        self.tok.padding_side = "left"
        eos = self.model.generation_config.eos_token_id
        eos_ids = eos if isinstance(eos, list) else [eos]
        self.eos = {int(e) for e in eos_ids if e is not None} | {int(self.tok.eos_token_id)}

    def _config(self) -> Any:
        from transformers import GenerationConfig

        c = self.cfg
        sample = c.temperature > 0
        return GenerationConfig(
            max_new_tokens=c.max_new_tokens,
            do_sample=sample,
            num_return_sequences=c.n,
            temperature=c.temperature if sample else None,
            top_p=c.top_p if sample else None,
            top_k=0 if sample else None,
            pad_token_id=self.tok.pad_token_id,
            eos_token_id=sorted(self.eos),
            stop_strings=list(c.stop) or None,
            output_logits=True,
            return_dict_in_generate=True,
        )

    def encode(self, chats: Sequence[Chat]) -> Any:
        """Left-padded input ids and attention mask of the chats' generation prompts."""
        texts = [
            self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
            for c in chats
        ]
        return self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def generate(self, chats: Sequence[Chat], seed: int) -> list[list[Completion]]:
        import torch

        enc = self.encode(chats).to(self.model.device)
        torch.manual_seed(seed)
        kwargs = {"tokenizer": self.tok} if self.cfg.stop else {}
        with torch.no_grad():
            out = self.model.generate(**enc, generation_config=self._config(), **kwargs)
        new = out.sequences[:, enc["input_ids"].shape[1] :]
        logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None])[..., 0]
        rows = [self._row(new[i].tolist(), logp[i]) for i in range(new.shape[0])]
        n = self.cfg.n
        return [rows[i * n : (i + 1) * n] for i in range(len(chats))]

    def _row(self, ids: list[int], logp: Any) -> Completion:
        end = next((i for i, t in enumerate(ids) if t in self.eos), None)
        length = len(ids) if end is None else end + 1
        text = self.tok.decode(ids[: end if end is not None else length], skip_special_tokens=True)
        text, stopped = trim_stop(text, self.cfg.stop)
        if stopped and end is None:  # the stop string ended it: count up to its token
            length = len(self.tok(text, add_special_tokens=False)["input_ids"]) or 1
            length = min(length, len(ids))
        total = float(logp[:length].sum())
        reason = "stop" if end is not None or stopped else "length"
        return Completion(text.strip(), length, total, total / length, reason)

    def close(self) -> None:
        del self.model


def _vllm(entry: PoolModel, cfg: GenerateConfig, where: str) -> Engine:
    from karma.generation.vllm_engine import VLLMEngine

    return VLLMEngine(entry, cfg, where)


def _openai(entry: PoolModel, cfg: GenerateConfig, where: str) -> Engine:
    from karma.generation.openai_engine import OpenAIEngine

    return OpenAIEngine(entry, cfg, where)


#: engine name -> factory(entry, settings, params key of the entry)
ENGINES: dict[str, Callable[[PoolModel, GenerateConfig, str], Engine]] = {
    "hf": HFEngine,
    "vllm": _vllm,
    "openai": _openai,
}


def open_engine(entry: PoolModel, cfg: GenerateConfig, where: str = "scores.measured") -> Engine:
    """The engine ``cfg.engine`` loaded with the pool entry."""
    return ENGINES[cfg.engine](entry, cfg, where)
