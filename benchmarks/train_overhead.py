"""Overhead of the train stage vs a plain TRL script (same config, data, tiny offline model).

The stage (``karma.training.train.run_train``) adds validation, input fingerprinting, dvclive
curves, the model card and flat metrics around TRL. The peer is the shortest plain TRL DPO script
doing the same work: read the parquet, load policy + reference, ``DPOTrainer.train()``, save.
With ``--heldout N`` both also score N held-out pairs before and after training: the stage with
its per-pair metrics (one reference pass, one policy pass after training), the peer with TRL's
``trainer.evaluate()`` before and after (what a plain script calls to get the two numbers).
Both run end to end (load, train, save) in this process after one untimed warm-up each,
alternating, ``--repeats`` times each; the minimum is the robust figure on a shared machine.

    python -m benchmarks.train_overhead [--steps 40] [--repeats 3] [--method dpo] [--heldout 32]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from karma.params import Params
from karma.training.settings import TrainConfig
from karma.training.train import TrainPaths, run_train
from karma.training.trl_config import trl_kwargs
from tests.fixtures import build_tiny_model


def make_pairs(path: Path, n: int, seed: int = 0) -> None:
    import random

    import polars as pl

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(["the sun", "water", "paris", "the moon", "atoms", "energy"])
        rows.append(
            {
                "prompt_id": f"p{i}",
                "prompt": [{"role": "user", "content": f"Explain {topic} briefly. ({i})"}],
                "chosen": [{"role": "assistant", "content": f"{topic} is a clear answer " * 3}],
                "rejected": [{"role": "assistant", "content": rng.choice(["no.", "bad bad"])}],
                "chosen_model": "a",
                "rejected_model": "b",
                "kinship": 0.5,
                "s_pref_chosen": 0.8,
                "s_pref_rejected": 0.2,
                "chosen_rating": 5.0,
                "rejected_rating": 1.0,
            }
        )
    pl.DataFrame(rows).write_parquet(path)


def plain_trl(
    cfg: TrainConfig, data: Path, base: Path, out: Path, seed: int, heldout: Path | None = None
) -> None:
    """A plain TRL script with the same arguments (the peer)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    kwargs = trl_kwargs(cfg, seed=seed, output_dir=out / "ck")
    set_seed(seed)
    ds = datasets.load_dataset("parquet", data_files=str(data), split="train")
    ds = ds.select_columns(["prompt", "chosen", "rejected"])
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base))
    if cfg.method == "dpo":
        ref = AutoModelForCausalLM.from_pretrained(str(base))
        test = None
        if heldout is not None:
            test = datasets.load_dataset("parquet", data_files=str(heldout), split="train")
            test = test.select_columns(["prompt", "chosen", "rejected"])
        trainer = DPOTrainer(
            model=model,
            ref_model=ref,
            args=DPOConfig(**kwargs),
            train_dataset=ds,
            eval_dataset=test,
            processing_class=tok,
        )
        if test is not None:
            trainer.evaluate()
    else:
        ds = ds.rename_column("chosen", "completion").remove_columns("rejected")
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**kwargs), train_dataset=ds, processing_class=tok
        )
    trainer.train()
    if heldout is not None and cfg.method == "dpo":
        trainer.evaluate()
    trainer.save_model(str(out / "policy"))
    tok.save_pretrained(str(out / "policy"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", choices=["dpo", "sft"], default="dpo")
    ap.add_argument("--heldout", type=int, default=0, help="held-out pairs scored (0: none)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="karma-bench-") as tmp:
        root = Path(tmp)
        base = build_tiny_model(root / "tiny", hidden_size=128, num_layers=4)
        data = root / "pairs.parquet"
        make_pairs(data, args.pairs)
        heldout = None
        if args.heldout:
            heldout = root / "test_prefs.parquet"
            make_pairs(heldout, args.heldout, seed=1)
        cfg = TrainConfig(
            method=args.method,  # type: ignore[arg-type]
            global_batch_size=4,
            trl={
                "max_steps": args.steps,
                "per_device_train_batch_size": 4,
                "learning_rate": 1e-4,
                "max_length": 128,
                "disable_tqdm": True,
            },
            checkpoint_steps=20,
        )
        # warm-up (imports, kernels), not timed
        warm = cfg.model_copy(update={"trl": {**cfg.trl, "max_steps": 1}})
        plain_trl(warm, data, base, root / "warm-plain", seed=0, heldout=heldout)
        w = root / "warm"
        warm_paths = TrainPaths(
            data=data,
            base=base,
            out=w / "p",
            checkpoints=w / "c",
            eval_data=heldout,
            live_dir=w / "l",
            metrics=w / "j",
        )
        run_train(Params(train=warm), warm_paths)
        times: dict[str, list[float]] = {"stage": [], "plain": []}
        for r in range(args.repeats):
            order = ["stage", "plain"] if r % 2 == 0 else ["plain", "stage"]
            for kind in order:
                out = root / f"{kind}{r}"
                t0 = time.perf_counter()
                if kind == "stage":
                    paths = TrainPaths(
                        data=data,
                        base=base,
                        out=out / "policy",
                        checkpoints=out / "ck",
                        eval_data=heldout,
                        live_dir=out / "live",
                        metrics=out / "metrics.json",
                    )
                    run_train(Params(train=cfg), paths)
                else:
                    plain_trl(cfg, data, base, out, seed=0, heldout=heldout)
                times[kind].append(time.perf_counter() - t0)
                print(f"run {r} {kind:5s}: {times[kind][-1]:6.2f} s", flush=True)
        for name, agg in (("min", min), ("median", statistics.median)):
            stage, plain = agg(times["stage"]), agg(times["plain"])
            print(
                f"{args.method}, {args.steps} steps, {args.heldout} held-out pairs, tiny model, "
                f"{name} of {args.repeats}: "
                f"stage {stage:.2f} s, plain TRL {plain:.2f} s, ratio stage/plain = "
                f"{stage / plain:.3f} (overhead {100 * (stage / plain - 1):+.1f}%)"
            )


if __name__ == "__main__":
    main()
