"""Throughput of the implicit-margin scorer: batched + length-sorted vs one sequence at a time.

The naive peer is the authors' ``cal_logp`` loop (Hesse73/Alignment-Potential-Metric): one forward
per response, full logits, ``log_softmax``, gather. Both score the same token ids on the same model
in the same run; the script checks they agree and prints tokens/s and the speed-up ratio.

    python -m benchmarks.select_pairs                      # tiny random model, 128 pairs
    python -m benchmarks.select_pairs --model models/base --pairs 32
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def naive_logps(model, seqs: list[tuple[list[int], int]]) -> np.ndarray:
    """Summed response log-probs, one unpadded sequence per forward (the authors' loop)."""
    import torch

    out = np.zeros(len(seqs))
    with torch.no_grad():
        for i, (ids, start) in enumerate(seqs):
            x = torch.tensor([ids])
            logp = model(x).logits.float().log_softmax(-1)[0, start - 1 : -1]
            out[i] = logp.gather(-1, x[0, start:, None]).sum().item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: tiny model)")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3, help="best of N, interleaved")
    args = parser.parse_args()

    import torch

    from karma.selection.margins import encode_sequence, load_scorer, sequence_logps
    from tests.fixtures import build_tiny_model, synthetic_pairs

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else build_tiny_model(Path(tmp) / "tiny")
        model, tok = load_scorer(model_dir, device="cpu")
        pairs = synthetic_pairs(args.pairs, seed=0)
        seqs = [
            encode_sequence(tok, row["prompt"], row[side])
            for row in pairs.iter_rows(named=True)
            for side in ("chosen", "rejected")
        ]
        n_tokens = sum(len(ids) for ids, _ in seqs)

        def batched() -> np.ndarray:
            return sequence_logps(
                model,
                seqs,
                pad_id=tok.pad_token_id,
                batch_size=args.batch_size,
                max_tokens=args.max_tokens,
                progress=False,
            )[0]

        def naive() -> np.ndarray:
            return naive_logps(model, seqs)

        runs = {"batched": batched, "naive": naive}
        results: dict[str, np.ndarray] = {}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for fn in runs.values():
            fn()  # warm-up
        for _ in range(args.repeats):  # interleaved, so load from other processes hits both
            for name, fn in runs.items():
                t0 = time.perf_counter()
                results[name] = fn()
                times[name].append(time.perf_counter() - t0)
        best = {name: min(t) for name, t in times.items()}
        diff = float(np.max(np.abs(results["batched"] - results["naive"])))
        print(f"model: {model_dir if args.model else 'tiny random Llama'}")
        print(
            f"pairs: {args.pairs}  sequences: {len(seqs)}  tokens: {n_tokens}  "
            f"torch threads: {torch.get_num_threads()}"
        )
        for name in ("batched", "naive"):
            print(f"{name:8s} {best[name]:8.3f} s  {n_tokens / best[name]:10.0f} tokens/s")
        print(f"max |sum logp| difference: {diff:.2e}")
        print(f"speed-up batched / naive: {best['naive'] / best['batched']:.2f}x")


if __name__ == "__main__":
    main()
