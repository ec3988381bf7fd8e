"""GPU check of the generation engines: ``vllm`` vs ``hf`` greedy on SmolLM2-135M-Instruct.

16 prompts of the embedded demo set, 32 greedy tokens each, through both engines
(:mod:`karma.generation.engines`); passes when the first 32 token ids agree on >= 15 of 16
prompts, and prints tokens/s of each engine (generated tokens / wall time of ``generate``,
model load excluded). Run by ``benchmarks/gpu_check.sh`` (needs ``models/base`` and vllm).

    python -m benchmarks.gpu_check [--model models/base] [--prompts 16] [--tokens 32]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import polars as pl

from karma.generation.engines import HFEngine
from karma.generation.settings import GenerateConfig, PoolModel


def demo_prompts(n: int) -> list[list[dict[str, str]]]:
    frame = pl.read_ndjson("data/demo/ultrafeedback_demo.jsonl").select("instruction")
    texts = frame.unique(maintain_order=True)["instruction"].head(n).to_list()
    return [[{"role": "user", "content": t}] for t in texts]


def trim(ids: list[int], eos: set[int]) -> list[int]:
    """Token ids up to and including the first end-of-sequence id."""
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    return ids if end is None else ids[: end + 1]


def hf_ids(model: str, chats: list, tokens: int) -> tuple[list[list[int]], float]:
    import torch

    cfg = GenerateConfig(max_new_tokens=tokens, batch_size=len(chats), device="cuda")
    eng = HFEngine(PoolModel(model=model), cfg)
    enc = eng.encode(chats).to("cuda")
    eng.generate(chats[:2], 0)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    rows = eng.generate(chats, 0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    out = eng.model.generate(
        **enc, max_new_tokens=tokens, do_sample=False, pad_token_id=eng.tok.pad_token_id
    )
    ids = [trim(row, eng.eos) for row in out[:, enc["input_ids"].shape[1] :].tolist()]
    return ids, sum(r[0].tokens for r in rows) / elapsed


def vllm_ids(model: str, chats: list, tokens: int) -> tuple[list[list[int]], float]:
    from karma.generation.vllm_engine import VLLMEngine

    cfg = GenerateConfig(engine="vllm", max_new_tokens=tokens, gpu_memory_utilization=0.5)
    eng = VLLMEngine(PoolModel(model=model), cfg)
    eng.generate(chats[:2], 0)  # warm-up
    t = time.perf_counter()
    rows = eng.generate(chats, 0)
    elapsed = time.perf_counter() - t
    params = eng.vllm.SamplingParams(temperature=0, max_tokens=tokens)
    prompts = [
        eng.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats
    ]
    outs = eng.llm.generate(prompts, params, use_tqdm=False)
    ids = [trim(list(o.outputs[0].token_ids), {int(eng.tok.eos_token_id)}) for o in outs]
    return ids, sum(r[0].tokens for r in rows) / elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    chats = demo_prompts(args.prompts)
    hf, hf_tps = hf_ids(args.model, chats, args.tokens)
    vl, vl_tps = vllm_ids(args.model, chats, args.tokens)
    same = sum(a[: args.tokens] == b[: args.tokens] for a, b in zip(hf, vl, strict=True))
    need = args.prompts - max(1, args.prompts // 16)
    result = {
        "prompts": args.prompts,
        "tokens": args.tokens,
        "agree": same,
        "need": need,
        "hf_tokens_per_s": round(hf_tps, 1),
        "vllm_tokens_per_s": round(vl_tps, 1),
        "pass": same >= need,
    }
    print(json.dumps(result, indent=1))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
