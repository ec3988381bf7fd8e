"""Stage ``train``: a policy trained on preference pairs with a TRL objective of the registry
(:mod:`karma.training.objectives`), tracked with dvclive, resumable.

The method's TRL config comes from params (:mod:`karma.training.trl_config`), the data in the
method's shape (:mod:`karma.training.data`); checkpoints and curves are in
:mod:`karma.training.checkpoints`. With ``--eval-data`` (held-out pairs), the method's own
held-out preference metrics are computed per pair before and after training and reported with
95 % intervals and a paired bootstrap interval of the change (:mod:`karma.training.heldout`);
with ``--dev-data`` (the dev pairs recipes are chosen on) the same metrics of those pairs, as
``dev.heldout.*``.

>>> from karma.params import Params
>>> from karma.training.settings import TrainConfig
>>> params = Params(train=TrainConfig(method="sft", trl={"max_steps": 5}))
>>> paths = TrainPaths(data="pairs.parquet", base="models/base", out="out/policy",
...                    checkpoints="checkpoints/train")
>>> metrics = run_train(params, paths)  # doctest: +SKIP

Several processes: ``train.launcher: torchrun`` (CPU or GPU) or ``accelerate`` (GPU, optionally
with an FSDP / DeepSpeed ``accelerate_config``) with ``train.num_processes: N`` makes the stage
re-run itself under that launcher (see :func:`launcher_prefix`). Every process trains; the
main one alone prepares the checkpoint directory and writes the outputs
(:class:`karma.core.distributed.Ranks`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karma.core import distributed
from karma.core.distributed import Ranks
from karma.core.errors import KarmaError
from karma.core.io import write_json
from karma.core.lm import load_causal_lm, provenance, write_provenance
from karma.core.stage import Stage, die_with_launcher, input_path, output_path, state_path
from karma.training.card import base_summary, model_card
from karma.training.checkpoints import (
    curve_callback,
    drop_stale,
    drop_stale_callback,
    final_metrics,
    fingerprint,
    prepare_run_dir,
)
from karma.training.data import has_rows, load_pairs
from karma.training.heldout import heldout_logps, heldout_summary, pair_metrics, tagged
from karma.training.objectives import objective
from karma.training.reference import read_stored, stored_trainer, with_keys
from karma.training.settings import TrainConfig
from karma.training.trl_config import (
    apply_recipe,
    batch_plan,
    build_lora_config,
    build_trl_config,
    check_heldout_modelled,
    check_settings,
)

if TYPE_CHECKING:
    from karma.params import Params

log = logging.getLogger(__name__)

WEIGHTS_INDEX = "model.safetensors.index.json"
#: Returned and logged, never written to a versioned output (they vary between reruns).
TIMINGS = ("tokens_per_second", "wall_time_s")


def launcher_prefix(params: Params, paths: TrainPaths | None = None) -> list[str] | None:
    """The command prefix that runs the train stage under ``train.launcher`` (None: in-process).

    ``torchrun`` is ``python -m torch.distributed.run --standalone`` (a free rendezvous port,
    no restarts), the same on CPU (gloo) and GPU (NCCL). ``accelerate`` is ``accelerate
    launch``: with ``train.accelerate_config`` that file decides the distributed setup (FSDP,
    DeepSpeed); without one, N > 1 processes get ``--multi_gpu`` on a free port (torchrun
    underneath). With ``paths`` (the stage process, before launching), everything cheap is
    validated first, so a bad setting is one error line rather than one per process.

    >>> from karma.training.settings import TrainConfig
    >>> cfg = TrainConfig(launcher="torchrun", num_processes=2)
    >>> from karma.params import Params
    >>> " ".join(launcher_prefix(Params(train=cfg))[1:])
    '-m torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 --max_restarts 0'
    """
    cfg = params.train
    if cfg.accelerate_config is not None and cfg.launcher != "accelerate":
        raise KarmaError("an accelerate config needs train.launcher accelerate",
                         field="train.accelerate_config", value=cfg.accelerate_config)  # fmt: skip
    if cfg.launcher == "python":
        if cfg.num_processes > 1:
            raise KarmaError(
                "launcher python runs one process",
                field="train.num_processes",
                value=cfg.num_processes,
                expected="1, or train.launcher torchrun (CPU or GPU) / accelerate (GPU)",
            )
        return None
    if paths is not None:
        _inputs(params, paths, cfg.num_processes)
    if cfg.launcher == "torchrun":
        return distributed.torchrun_argv(cfg.num_processes)
    if cfg.accelerate_config and not Path(cfg.accelerate_config).is_file():
        raise KarmaError("accelerate config file not found", field="train.accelerate_config",
                         value=cfg.accelerate_config)  # fmt: skip
    return distributed.accelerate_argv(cfg.num_processes, cfg.accelerate_config)


def make_trainer(
    cfg: TrainConfig,
    base: str | Path,
    *,
    seed: int,
    output_dir: str | Path,
    dataset: Any,
    callbacks: Sequence[Any] = (),
    eval_dataset: Any = None,
    world_size: int = 1,
    stored: Stored | None = None,
) -> Any:
    """Build the method's TRL trainer exactly as the stage uses it.

    ``eval_dataset`` (held-out pairs in the method's shape; methods with held-out metrics) is
    tokenized by TRL like the training data; the trainer never evaluates by itself
    (:func:`karma.training.heldout.heldout_logps` does). ``stored``: reference log-probs of the
    reference stage (datasets with :data:`karma.training.reference.KEY`), taken by TRL as
    precomputed, and no reference model is loaded.
    """
    from transformers import set_seed

    obj = objective(cfg.method)
    args = build_trl_config(cfg, seed=seed, output_dir=output_dir, world_size=world_size)
    peft_config = build_lora_config(cfg.lora)
    set_seed(seed)
    model, tok = load_causal_lm(base, dtype=cfg.dtype)
    extra: dict[str, Any] = {}
    trainer_class = obj.trainer_class()
    if obj.reference and stored is not None:
        args.precompute_ref_log_probs = True
        trainer_class = stored_trainer(trainer_class, stored.values, stored.where)
    elif obj.reference:
        # An explicit reference model (TRL would otherwise reload it by name, which fails for
        # an unsaved model); with LoRA the adapter-disabled policy is the reference.
        ref = None if peft_config is not None else load_causal_lm(base, dtype=cfg.dtype)[0]
        extra["ref_model"] = ref
    if obj.heldout is not None:
        extra["eval_dataset"] = eval_dataset
    return trainer_class(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tok,
        callbacks=list(callbacks),
        peft_config=peft_config,
        **extra,
    )


def save_policy(
    trainer: Any,
    out_dir: str | Path,
    card: str,
    *,
    ranks: Ranks | None = None,
    base: str | Path | None = None,
    dtype: str = "float32",
    sharded: bool | None = None,
) -> None:
    """Write the policy (safetensors with LoRA merged, tokenizer, ``README.md`` card).

    Call on every process. ``Trainer.save_model`` gathers sharded weights (FSDP, DeepSpeed
    ZeRO-3) collectively and writes on the main process only; after a barrier the main process
    writes the card. LoRA: merged in memory on the main process, or, when the model is sharded
    (``sharded``; default: the trainer's FSDP / DeepSpeed state), the adapter is saved
    collectively and merged into ``base`` from disk.
    """
    ranks = ranks or Ranks()
    out = Path(out_dir)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    if sharded is None:
        sharded = bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)
    if hasattr(unwrapped, "merge_and_unload") and not sharded:
        if ranks.main:
            unwrapped.merge_and_unload().save_pretrained(str(out), safe_serialization=True)
            trainer.processing_class.save_pretrained(str(out))
    elif hasattr(unwrapped, "merge_and_unload"):
        adapter = out / ".adapter"
        trainer.save_model(str(adapter))
        ranks.barrier()
        if ranks.main:
            from peft import PeftModel

            if base is None:
                raise KarmaError("merging a sharded LoRA adapter needs the base model directory")
            model, tok = load_causal_lm(base, dtype=dtype)
            merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            merged.save_pretrained(str(out), safe_serialization=True)
            tok.save_pretrained(str(out))
            shutil.rmtree(adapter)
    else:
        trainer.save_model(str(out))
    ranks.barrier()  # save_model has no barrier of its own
    if ranks.main:
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle holding local paths
        if not any((out / f).is_file() for f in ("model.safetensors", WEIGHTS_INDEX)):
            raise KarmaError(
                "the saved policy has no full weights (a sharded state dict?)",
                file=out,
                expected="FSDP state_dict_type FULL_STATE_DICT, or DeepSpeed "
                "stage3_gather_16bit_weights_on_model_save: true, in the accelerate config",
            )
        (out / "README.md").write_text(card)


@dataclass(frozen=True)
class Stored:
    """Reference log-probs of the reference stage: ``{split: {pair key: (chosen, rejected)}}``."""

    values: dict[str, dict[str, tuple[float, float]]]
    where: Path


@dataclass(frozen=True, kw_only=True)
class TrainPaths:
    """Paths of the ``train`` stage."""

    data: Path = input_path("preference pairs: prompt, chosen, rejected (TRL conversational)")
    base: Path = input_path("base model directory", is_dir=True)
    out: Path = output_path("policy: safetensors, tokenizer, README.md model card", is_dir=True)
    checkpoints: Path = state_path("persisted checkpoints: a killed run resumes from here")
    eval_data: Path | None = input_path(
        "held-out preference pairs (the preferences stage's test_prefs.parquet): the method's "
        "held-out preference metrics before and after training, with intervals",
        required=False,
    )
    dev_data: Path | None = input_path(
        "dev preference pairs (the preferences stage's dev_prefs.parquet): the same held-out "
        "metrics (dev.heldout.*), to choose recipes on without looking at the test pairs",
        required=False,
    )
    live_dir: Path | None = output_path("dvclive curves (plots/metrics/*.tsv)", is_dir=True,
                                        required=False)  # fmt: skip
    metrics: Path | None = output_path("final training metrics", ".json", required=False)
    reference_logps: Path | None = input_path(
        "the reference stage's output: stored reference log-probs (train.reference stored)",
        is_dir=True, required=False,
    )  # fmt: skip


def _stored(cfg: TrainConfig, paths: TrainPaths) -> Stored | None:
    """The stored reference log-probs when ``train.reference`` is stored (checked)."""
    obj = objective(cfg.method)
    if cfg.reference == "live" or not obj.reference:
        return None
    spec = obj.heldout
    if spec is None or spec.tokens != "dpo":
        raise KarmaError("stored reference log-probs are TRL's DPO precompute", field=
                         "train.reference", value=cfg.reference, expected="live for method "
                         f"{cfg.method} (stored: dpo, ipo)")  # fmt: skip
    if paths.reference_logps is None:
        raise KarmaError("train.reference stored reads the reference stage's output",
                         field="--reference-logps", expected="its directory")  # fmt: skip
    return Stored(read_stored(paths.reference_logps), Path(paths.reference_logps))


def heldout_files(paths: TrainPaths) -> dict[str, Path]:
    """The held-out pairs by part, ``test`` (``--eval-data``) and ``dev`` (``--dev-data``); a
    file without rows (``preferences.dev_fraction: 0``) has no metrics and is left out."""
    files = {}
    for part, f in (("test", paths.eval_data), ("dev", paths.dev_data)):
        if f is not None and not has_rows(f):
            log.warning("%s: no held-out pairs, no %s metrics", f, part)
        elif f is not None:
            files[part] = Path(f)
    return files


def _inputs(params: Params, paths: TrainPaths, world: int) -> tuple[TrainConfig, Any, Any, Any]:
    """Validate everything cheap (before any model loads or any process is launched)."""
    cfg = apply_recipe(params.train)
    check_settings(cfg)  # in a second, before TRL and torch load
    obj = objective(cfg.method)
    stored = _stored(cfg, paths)
    args = build_trl_config(cfg, seed=params.seed, output_dir=paths.checkpoints, world_size=world)
    build_lora_config(cfg.lora)
    dataset = load_pairs(paths.data, obj.shape)
    heldout = None
    files = heldout_files(paths)
    if files and obj.heldout is None:
        log.warning("method %s has no held-out preference metrics: --eval-data / --dev-data "
                    "are not used", cfg.method)  # fmt: skip
    elif files:
        check_heldout_modelled(cfg, args)
        heldout = tagged({part: load_pairs(f, obj.shape) for part, f in files.items()})
    if stored is not None:
        dataset = with_keys(dataset)
        heldout = None if heldout is None else with_keys(heldout)
    return cfg, dataset, heldout, stored


def _prepare(cfg: TrainConfig, paths: TrainPaths, seed: int, ranks: Ranks) -> tuple[Path, Any]:
    """The checkpoint directory and the checkpoint to resume (main process; all receive it)."""
    world = ranks.world

    def prepare() -> tuple[Path, Path | None]:
        fp = fingerprint(cfg, paths, seed, world_size=world)
        return prepare_run_dir(paths.checkpoints, fp, world)

    run_dir, resume = ranks.on_main(prepare)
    if resume is not None and ranks.main:
        log.info("resuming from checkpoint %s", resume)
    elif ranks.main:
        log.info("no checkpoint for this configuration (%s): training from scratch", run_dir.name)
    plan = batch_plan(cfg, world)
    if not plan.derived and world > 1 and ranks.main:
        log.warning("global batch %d = %d processes x %d x accumulation %d (set "
                    "train.global_batch_size to keep it fixed)", plan.global_batch, world,
                    plan.per_device, plan.accumulation)  # fmt: skip
    return run_dir, resume


def _fit(trainer: Any, cfg: TrainConfig, resume: Path | None, parts: Sequence[str]
         ) -> dict[str, Any]:  # fmt: skip
    """Train (resuming), with the held-out log-probs of each part (``test``, ``dev``) before
    and after; the run's numbers."""
    obj = objective(cfg.method)
    spec = obj.heldout
    # Before training the policy has the reference's weights (the same base; LoRA starts at
    # zero): for a reference objective the reference pass gives TRL's "before" metrics.
    before = {}
    if spec is not None:
        before = {p: heldout_logps(trainer, spec, reference=obj.reference, part=p)
                  for p in parts}  # fmt: skip
    start_step = start_tokens = 0
    if resume is not None:
        state = json.loads((resume / "trainer_state.json").read_text())
        start_step = int(state.get("global_step", 0))
        start_tokens = int(state.get("num_input_tokens_seen", 0))
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    wall = time.perf_counter() - t0
    metrics: dict[str, Any] = final_metrics(trainer.state.log_history)
    tokens = int(trainer.state.num_input_tokens_seen) - start_tokens
    metrics.update(
        train_loss=float(result.training_loss),
        steps=int(trainer.state.global_step),
        epoch=float(trainer.state.epoch or 0.0),
        resumed_from_step=start_step,
        pairs=0,
        tokens=tokens,
        tokens_per_second=tokens / wall if wall > 0 else 0.0,
        wall_time_s=wall,
    )
    for part, logps in before.items():
        assert spec is not None
        after = heldout_logps(trainer, spec, part=part)
        ref = logps if obj.reference else None
        metrics[f"_heldout_{part}"] = (pair_metrics(spec, logps, ref, trainer.args),
                                       pair_metrics(spec, after, ref, trainer.args))  # fmt: skip
    return metrics


def run_train(
    params: Params, paths: TrainPaths, *, callbacks: Sequence[Any] = ()
) -> dict[str, Any]:
    """Stage ``train``: validate, resume if possible, train, write policy, curves and metrics.

    Under a launcher every process runs this: the main process alone fingerprints the inputs
    and prepares the checkpoint directory (the others wait and receive its answer), all train
    and save collectively, and the main process alone writes the card, provenance and metrics.
    """
    die_with_launcher()  # also when launched by hand, without pipeline.execute
    world = distributed.world_size()
    cfg, dataset, heldout, stored = _inputs(params, paths, world)
    seed = params.seed
    ranks = Ranks.start(field="train.launcher")
    run_dir, resume = _prepare(cfg, paths, seed, ranks)
    live = [] if paths.live_dir is None else [curve_callback(paths.live_dir)]
    # TRL's log printer (print / tqdm.write) goes to stdout, which holds only the metrics JSON
    with contextlib.redirect_stdout(sys.stderr):
        trainer = make_trainer(cfg, paths.base, seed=seed, output_dir=run_dir, dataset=dataset,
                               callbacks=[*live, drop_stale_callback(run_dir), *callbacks],
                               eval_dataset=heldout,
                               world_size=world, stored=stored)  # fmt: skip
        if trainer.accelerator.num_processes != world:
            raise KarmaError(f"accelerate sees {trainer.accelerator.num_processes} processes, "
                             f"{world} were launched", field="train.launcher")  # fmt: skip
        metrics = _fit(trainer, cfg, resume, [] if heldout is None else list(heldout_files(paths)))
    metrics["pairs"] = len(dataset) // (2 if objective(cfg.method).shape == "unpaired" else 1)
    metrics.update(batch_plan(cfg, world).metrics())
    for part, prefix in (("test", ""), ("dev", "dev.")):
        pair_values = metrics.pop(f"_heldout_{part}", None)
        if pair_values is not None:
            metrics.update(heldout_summary(*pair_values, seed=seed, prefix=prefix))
    base_prov = provenance(paths.base)
    metrics.update({"meta.base_model": str(base_prov.get("source", paths.base)),
                    "meta.seed": seed, "meta.train_method": cfg.method})  # fmt: skip
    bad = [k for k in ("loss", "train_loss") if k in metrics and not math.isfinite(metrics[k])]
    if bad:  # the same logged (gathered) loss on every process
        if not ranks.main:
            raise SystemExit(1)
        raise KarmaError(f"training diverged: non-finite {bad}", field="train.trl")
    card = ""
    if ranks.main:
        card = model_card(cfg, paths, seed=seed, base_summary=base_summary(paths.base),
                          n_pairs=metrics["pairs"], metrics=metrics)  # fmt: skip
    save_policy(trainer, paths.out, card, ranks=ranks, base=paths.base, dtype=cfg.dtype)
    if ranks.main:
        write_provenance(paths.out, {
            "source": base_prov.get("source", str(paths.base)), "base": base_prov,
            "method": cfg.method, "seed": seed, "recipe": cfg.recipe,
            "global_batch_size": cfg.global_batch_size, "lora": cfg.lora is not None,
        })  # fmt: skip
        if paths.metrics is not None:  # timings vary between identical runs: logged only
            write_json(paths.metrics, {k: v for k, v in metrics.items() if k not in TIMINGS})
        drop_stale(run_dir)
        if not cfg.keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
        log.info("%s: %d steps, loss %.4f, %.0f tokens/s, %.1f s", cfg.method, metrics["steps"],
                 metrics.get("loss", float("nan")), metrics["tokens_per_second"],
                 metrics["wall_time_s"])  # fmt: skip
    del trainer  # the DDP model holds the process group: free it first
    ranks.close()
    return metrics


STAGE = Stage(
    name="train",
    settings=("train", "seed"),
    paths=TrainPaths,
    run=run_train,
    launcher=launcher_prefix,
    help="A TRL objective of the registry (train.method: dpo, ipo, simpo, cpo, orpo, kto, sft) "
    "on the pairs; its own held-out preference metrics; curves through dvclive; checkpoints "
    "every train.checkpoint_steps, resumed after a kill.",
)
