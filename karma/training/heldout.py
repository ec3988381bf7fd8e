"""Held-out preference metrics: per pair, before and after training, each objective's own.

The trainer tokenizes the held-out pairs (``--eval-data``) like its training data; the summed
completion log-probs of every pair are read from that tokenized set
(:func:`heldout_logps`, in the layout the registry names: DPO's, CPO / ORPO's or KTO's unpaired
rows) under the policy and, for a reference-model objective, the reference. The objective's
metric definition (:class:`karma.training.objectives.HeldoutSpec`) turns them into per-pair
metrics whose means equal the trainer's own ``evaluate()`` (checked in the tests for every
objective), and :func:`heldout_summary` gives means with 95 % intervals and a paired bootstrap
interval of the change.

The held-out set may hold two parts, the test pairs (results are reported on them) and the dev
pairs (recipes are chosen on them): :func:`tagged` marks each row with its part
(:data:`PART`), the trainer tokenizes both as one set, and :func:`heldout_logps` scores one
part at a time, in the same batches as if it were alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import numpy as np

from karma.training.objectives import HeldoutSpec, PairLogps

N_BOOT = 10_000
#: TRL's precomputed reference columns (see :mod:`karma.training.reference`).
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
#: Column naming the part of the held-out set a row belongs to (``test`` or ``dev``).
PART = "heldout_part"
#: Batch -> (chosen sums, rejected sums, chosen counts, rejected counts), torch tensors.
Scorer = Callable[[Any, list[int]], tuple[Any, Any, Any, Any]]


def _fused_logps(model: Any, batch: dict[str, Any], accelerator: Any) -> tuple[Any, ...]:
    """Summed completion log-probs and completion lengths of a DPO-collated batch (chosen rows
    first), as TRL's DPO and KTO losses compute them: TRL's fused LM head, prompt and padding
    masked out."""
    skip = ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")
    kwargs = {k: v for k, v in batch.items() if k not in skip}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with accelerator.autocast():
        out = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True)
    width = batch["completion_mask"].shape[1] - 1
    sums = out.log_probs[:, -width:].sum(dim=1).float()
    counts = batch["completion_mask"][:, 1:].sum(dim=1).float()
    return (*sums.chunk(2, dim=0), *counts.chunk(2, dim=0))


def _labelled_logps(model: Any, batch: dict[str, Any], accelerator: Any) -> tuple[Any, ...]:
    """Summed log-probs and lengths of the labelled tokens (label != -100) of CPO / ORPO's
    ``chosen_*`` / ``rejected_*`` rows, right-padded, from the model's own logits."""
    import torch

    rows = [*batch["chosen"], *batch["rejected"]]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), int(batch["pad"]), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (seq, lab) in enumerate(rows):
        ids[r, : len(seq)], labels[r, : len(lab)] = torch.tensor(seq), torch.tensor(lab)
        mask[r, : len(seq)] = 1
    ids, labels, mask = (t.to(accelerator.device) for t in (ids, labels, mask))
    with accelerator.autocast():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    labels = labels[:, 1:]
    keep = labels != -100
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logps.gather(2, labels.clamp(min=0).unsqueeze(2)).squeeze(2)
    sums, counts = (token * keep).sum(dim=1), keep.sum(dim=1).float()
    return (*sums.chunk(2, dim=0), *counts.chunk(2, dim=0))


def tagged(parts: dict[str, Any]) -> Any:
    """One held-out ``datasets.Dataset`` of the named parts (e.g. ``{"test": ..., "dev":
    ...}``, in that order), each row marked with its part in :data:`PART`."""
    import datasets

    marked = [d.add_column(PART, [name] * len(d)) for name, d in parts.items()]
    return marked[0] if len(marked) == 1 else datasets.concatenate_datasets(marked)


def part_names(trainer: Any, spec: HeldoutSpec) -> list[str] | None:
    """The part of each pair of the trainer's tokenized held-out set (None: not marked)."""
    data = trainer.eval_dataset
    if PART not in data.column_names:
        return None
    parts = list(data[PART])
    return parts[0::2] if spec.tokens == "kto" else parts


def _scorer(trainer: Any, spec: HeldoutSpec, stored: bool = False
            ) -> tuple[int, list[int], Scorer]:  # fmt: skip
    """``(pairs, widths, score(model, pair indices))`` for the trainer's tokenized held-out set;
    ``stored``: the reference log-probs the set carries (TRL's precomputed columns)."""
    data, acc = trainer.eval_dataset, trainer.accelerator
    if spec.tokens == "cpo":
        cols = ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
        rows = data.select_columns(cols)
        n = len(rows)
        width = [max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"])) for r in rows]
        pad = trainer.processing_class.pad_token_id

        def score_cpo(model: Any, idx: list[int]) -> tuple[Any, ...]:
            sel = [rows[i] for i in idx]
            batch = {"pad": pad, "chosen": [(r[cols[0]], r[cols[1]]) for r in sel],
                     "rejected": [(r[cols[2]], r[cols[3]]) for r in sel]}  # fmt: skip
            return _labelled_logps(model, batch, acc)

        return n, width, score_cpo
    if spec.tokens == "kto":  # unpaired rows: pair i is rows 2i (chosen) and 2i + 1 (rejected)
        from trl.trainer.dpo_trainer import DataCollatorForPreference

        flat = data.select_columns(["prompt_ids", "completion_ids", "label"])
        if len(flat) % 2 or flat["label"][0::2] != [True] * (len(flat) // 2):
            raise ValueError("KTO held-out rows are not the pairs' chosen / rejected rows")
        prompts, completions = flat["prompt_ids"], flat["completion_ids"]
        pairs = [
            {"prompt_ids": prompts[i], "chosen_ids": completions[i],
             "rejected_ids": completions[i + 1]} for i in range(0, len(flat), 2)
        ]  # fmt: skip
        collate = DataCollatorForPreference(pad_token_id=trainer.processing_class.pad_token_id,
                                            max_length=trainer.args.max_length)  # fmt: skip
    else:
        cols = ["prompt_ids", "chosen_ids", "rejected_ids", *(REF_COLUMNS if stored else ())]
        pairs, collate = list(data.select_columns(cols)), trainer.data_collator
    width = [len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"]))
             for p in pairs]  # fmt: skip

    def score_pairs(model: Any, idx: list[int]) -> tuple[Any, ...]:
        batch = collate([pairs[i] for i in idx])
        batch = {k: v.to(acc.device) for k, v in batch.items()}
        if stored:
            counts = batch["completion_mask"][:, 1:].sum(dim=1).float().chunk(2, dim=0)
            return (*(batch[c].float() for c in REF_COLUMNS), *counts)
        return _fused_logps(model, batch, acc)

    return len(pairs), width, score_pairs


def heldout_logps(
    trainer: Any, spec: HeldoutSpec, *, reference: bool = False, part: str | None = None
) -> PairLogps:
    """Summed completion log-probs and lengths (chosen, rejected) of every held-out pair of the
    trainer's ``eval_dataset`` (of ``part`` only, when given: see :func:`tagged`) under the
    policy, or the reference model, in dataset order.

    Call on every process: each scores its share of the pairs (an equal number of forward
    passes, as sharded models need) and all receive the whole arrays. Batches are made of pairs
    of similar length (little padding). LoRA's reference is the policy with its adapter disabled;
    reference log-probs stored in the set (``train.reference: stored``) are read, not computed.
    """
    import torch

    acc = trainer.accelerator
    stored = reference and spec.tokens == "dpo" and REF_COLUMNS[0] in trainer.eval_dataset.features
    n, width, score = _scorer(trainer, spec, stored)
    names = part_names(trainer, spec) if part is not None else None
    chosen = [i for i in range(n) if names is None or names[i] == part]
    slot = {i: k for k, i in enumerate(chosen)}
    world, rank = acc.num_processes, acc.process_index
    order = sorted(chosen, key=lambda i: (width[i], i))
    n = len(order)
    bs = int(trainer.args.per_device_eval_batch_size)
    model, adapter_off = trainer.model, contextlib.nullcontext()
    if reference and not stored:
        if getattr(trainer, "ref_model", None) is not None:
            model = trainer.ref_model
        else:
            adapter_off = acc.unwrap_model(trainer.model).disable_adapter()
    out = np.full((n, 4), np.nan)
    if not n:
        return PairLogps(out[:, :2], out[:, 2:])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), adapter_off:
            for start in range(0, n, bs * world):
                mine = order[start + rank * bs : min(start + (rank + 1) * bs, n)]
                values = score(model, mine or order[-1:])
                rows = torch.full((bs, 5), -1.0, dtype=torch.float64, device=acc.device)
                k = len(mine)
                rows[:k, 0] = torch.tensor(mine, dtype=torch.float64)
                for col, value in enumerate(values, start=1):
                    rows[:k, col] = value[:k].double()
                if world > 1:
                    rows = acc.gather(rows)
                for i, *vals in rows.cpu().numpy():
                    if i >= 0:
                        out[slot[int(i)]] = vals
    finally:
        model.train(was_training)
    return PairLogps(out[:, :2], out[:, 2:])


def pair_metrics(
    spec: HeldoutSpec, policy: PairLogps, reference: PairLogps | None, args: Any
) -> dict[str, np.ndarray]:
    """The objective's per-pair metrics of ``policy`` (against ``reference``'s log-probs for a
    reference-model objective), in the order of ``spec.metrics``."""
    ref = None if reference is None else reference.policy
    values = spec.compute(PairLogps(policy.policy, policy.counts, ref), args)
    return {m: values[m] for m in spec.metrics}


def heldout_summary(
    before: dict[str, np.ndarray], after: dict[str, np.ndarray], *, seed: int, prefix: str = ""
) -> dict[str, float]:
    """The ``heldout.*`` keys of ``metrics/train.json``: before, after and the paired change of
    each metric, each with ``.ci_low`` / ``.ci_high``, and ``heldout.n`` (pairs); ``prefix``
    goes before each key (``dev.``: the dev pairs' ``dev.heldout.*``).

    Intervals from :mod:`karma.core.stats` (95 %): Wilson for the accuracy, Student t otherwise;
    the change's is a paired bootstrap over the pairs seeded by ``seed`` (:data:`N_BOOT`
    resamples).
    """
    from karma.core.stats import mean_ci, paired_bootstrap_ci

    out: dict[str, float] = {"heldout.n": len(next(iter(after.values())))}
    for m in after:
        for who, values in (("before", before[m]), ("after", after[m])):
            est = mean_ci(values, binary=m == "reward_accuracy")
            out.update({f"heldout.{who}.{m}": est.mean, f"heldout.{who}.{m}.ci_low": est.ci_low,
                        f"heldout.{who}.{m}.ci_high": est.ci_high})  # fmt: skip
        low, high = paired_bootstrap_ci(after[m], before[m], seed=seed, n_boot=N_BOOT)
        delta = float(np.mean(after[m] - before[m]))
        key = f"heldout.delta.{m}"
        out.update({key: delta, f"{key}.ci_low": low, f"{key}.ci_high": high})
    return {prefix + k: v for k, v in out.items()}
