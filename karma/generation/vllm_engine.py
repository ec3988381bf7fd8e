"""The ``vllm`` engine: offline ``vllm.LLM`` on GPUs (an optional extra, never imported on CPU).

``generate.tensor_parallel_size`` splits one model over GPUs, ``generate.data_parallel_size``
runs replicas; across models, the pool fans out as DVC stage instances
(``dvc exp run --queue`` / ``dvc queue start -j N``, one GPU each).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from karma.core.errors import KarmaError
from karma.generation.completion import Chat, Completion, trim_stop
from karma.generation.settings import GenerateConfig, PoolModel

log = logging.getLogger(__name__)

INSTALL = "pip install 'karma-align[vllm]' (or pip install vllm) on a machine with a GPU"


def import_vllm() -> Any:
    """The ``vllm`` module, or one line saying how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise KarmaError(
            f"vllm is not installed ({err.name or err})",
            field="generate.engine",
            value="vllm",
            expected=INSTALL,
        ) from None
    return vllm


class VLLMEngine:
    """Offline batched generation with vLLM; prompts through the model's chat template."""

    name = "vllm"

    def __init__(self, entry: PoolModel, cfg: GenerateConfig, where: str = "scores.measured"):
        vllm = import_vllm()
        from karma.generation.pool import materialize

        self.cfg = cfg
        self.version = f"vllm {vllm.__version__}"
        kwargs: dict[str, Any] = {
            "model": materialize(entry, cfg.dtype),
            "dtype": cfg.dtype,
            "seed": cfg.seed,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "gpu_memory_utilization": cfg.gpu_memory_utilization,
        }
        if entry.revision and entry.derive is None:
            kwargs["revision"] = entry.revision
        if cfg.data_parallel_size > 1:
            kwargs["data_parallel_size"] = cfg.data_parallel_size
        self.llm = vllm.LLM(**kwargs)
        self.tok = self.llm.get_tokenizer()
        if entry.chat_template:
            self.tok.chat_template = entry.chat_template
        self.vllm = vllm

    def generate(self, chats: Sequence[Chat], seed: int) -> list[list[Completion]]:
        c = self.cfg
        params = self.vllm.SamplingParams(
            n=c.n,
            temperature=c.temperature,
            top_p=c.top_p,
            max_tokens=c.max_new_tokens,
            seed=seed,
            stop=list(c.stop) or None,
            logprobs=0,
        )
        prompts = [
            self.tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            for chat in chats
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [[self._row(o) for o in out.outputs] for out in outs]

    def _row(self, o: Any) -> Completion:
        lps = []
        for tok_id, entry in zip(o.token_ids, o.logprobs or [], strict=False):
            lps.append(float(entry[tok_id].logprob))
        total = float(sum(lps)) if lps else None
        n = len(o.token_ids)
        text, _ = trim_stop(o.text, self.cfg.stop)
        reason = "length" if o.finish_reason == "length" else "stop"
        return Completion(
            text.strip(), n, total, total / n if n and total is not None else None, reason
        )

    def close(self) -> None:
        del self.llm
