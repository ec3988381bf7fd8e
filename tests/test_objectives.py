"""The training-method registry: every objective trains on the same pairs (finite loss, weights
move), and its held-out preference metrics equal the trainer's own ``evaluate()``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from karma.core.errors import KarmaError
from karma.training.data import load_pairs
from karma.training.heldout import heldout_logps, pair_metrics, tagged
from karma.training.objectives import OBJECTIVES
from karma.training.settings import TrainConfig
from karma.training.train import make_trainer
from karma.training.trl_config import apply_recipe, build_trl_config, check_heldout_modelled
from tests import test_training
from tests.test_training import FAST_TRL, _state, make_pairs, torch_equal

PREFERENCE = [name for name, o in OBJECTIVES.items() if o.heldout is not None]
#: |ours - evaluate()| allowed (float32 forward passes batched differently)
TOL = 2e-5


# the training tests' fixtures: a per-test cache (autouse), 16 training and 10 held-out pairs
karma_cache = test_training.karma_cache
pairs_file = test_training.pairs_file
test_file = test_training.test_file
dev_file = test_training.dev_file


def _moved(trainer: Any, base: Path) -> int:
    before = _state(base)
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return sum(not torch_equal(after[k], before[k]) for k in before)


def _config(method: str, eval_batch: int) -> TrainConfig:
    return TrainConfig(
        method=method,
        global_batch_size=4,
        trl={**FAST_TRL, "max_steps": 2, "per_device_eval_batch_size": eval_batch},
    )


#: Largest |ours - evaluate()| per objective, filled by the test (printed with -s).
MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("method", PREFERENCE)
def test_objective_trains_and_heldout_is_trls(
    method: str, tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path
):
    """Each preference objective trains 2 steps with a finite loss on the same pairs and moves
    the weights; before and after, the mean of each per-pair held-out metric equals the key of
    the trainer's own ``evaluate()`` the registry names."""
    obj = OBJECTIVES[method]
    spec = obj.heldout
    assert spec is not None
    # KTO: one eval batch (its batch means of rewards are then the pair means); else 2 of 5
    eval_batch = 20 if obj.shape == "unpaired" else 5
    cfg = _config(method, eval_batch)
    trainer = make_trainer(
        cfg,
        tiny_model_dir,
        seed=0,
        output_dir=tmp_path / "ck",
        dataset=load_pairs(pairs_file, obj.shape),
        eval_dataset=load_pairs(test_file, obj.shape),
    )
    assert type(trainer).__name__ == obj.trainer.split(":")[1]
    first = heldout_logps(trainer, spec, reference=obj.reference)
    assert first.policy.shape == (10, 2) and np.isfinite(first.policy).all()
    assert (first.counts > 0).all()
    ref = first if obj.reference else None
    worst = 0.0
    for when in ("before", "after"):
        if when == "after":
            loss = trainer.train().training_loss
            assert math.isfinite(loss), method
            assert _moved(trainer, tiny_model_dir) > 10, method
        ours = pair_metrics(spec, heldout_logps(trainer, spec), ref, trainer.args)
        assert list(ours) == list(spec.metrics)
        trl = trainer.evaluate()
        for name, key in spec.trl_keys.items():
            diff = abs(float(ours[name].mean()) - trl[key])
            worst = max(worst, diff)
            assert diff <= TOL * max(1.0, abs(trl[key])), (method, when, name, key, trl[key])
    if "reward_margin" in spec.metrics:
        assert ours["reward_margin"].mean() != pytest.approx(0.0, abs=1e-6)  # training moved it
    MEASURED[method] = worst
    print(f"{method}: max |ours - evaluate()| = {worst:.2e}")


@pytest.mark.parametrize("method", ["dpo", "cpo", "kto"])  # the three held-out layouts
def test_heldout_parts_score_alone(
    method: str, tiny_model_dir: Path, pairs_file: Path, test_file: Path, dev_file: Path,
    tmp_path: Path,
):  # fmt: skip
    """Test and dev pairs tokenized as one held-out set (:func:`tagged`): each part is scored
    on its own, the test part exactly as without the dev pairs."""
    obj = OBJECTIVES[method]
    spec = obj.heldout
    assert spec is not None
    parts = {"test": load_pairs(test_file, obj.shape), "dev": load_pairs(dev_file, obj.shape)}
    scores = {}
    for name, held in (("alone", parts["test"]), ("both", tagged(parts))):
        data = load_pairs(pairs_file, obj.shape)
        trainer = make_trainer(_config(method, 4), tiny_model_dir, seed=0, eval_dataset=held,
                               output_dir=tmp_path / name, dataset=data)  # fmt: skip
        scores[name] = {p: heldout_logps(trainer, spec, part=p) for p in ("test", "dev")}
    alone, both = scores["alone"]["test"], scores["both"]
    assert both["test"].policy.shape == (10, 2) and both["dev"].policy.shape == (8, 2)
    np.testing.assert_array_equal(both["test"].policy, alone.policy)  # same batches, same bytes
    np.testing.assert_array_equal(both["test"].counts, alone.counts)
    assert np.isfinite(both["dev"].policy).all()
    assert not np.isin(both["dev"].policy, both["test"].policy).all()
    # an unmarked set has no parts: "dev" is then every pair
    assert scores["alone"]["dev"].policy.shape == (10, 2)


def test_sft_trains(tiny_model_dir: Path, pairs_file: Path, tmp_path: Path):
    """SFT trains on prompt + chosen (no held-out preference metrics)."""
    assert OBJECTIVES["sft"].heldout is None
    cfg = _config("sft", 4)
    trainer = make_trainer(cfg, tiny_model_dir, seed=0, output_dir=tmp_path / "ck",
                           dataset=load_pairs(pairs_file, "sft"))  # fmt: skip
    assert math.isfinite(trainer.train().training_loss)
    assert _moved(trainer, tiny_model_dir) > 10


def test_unpaired_rows_are_trls_unpairing(pairs_file: Path):
    """KTO's rows come from TRL's own unpairing, pair i at rows 2i (chosen) and 2i + 1."""
    paired = load_pairs(pairs_file, "paired")
    rows = load_pairs(pairs_file, "unpaired")
    assert rows.column_names == ["prompt", "completion", "label"] and len(rows) == 32
    assert rows[2]["completion"] == paired[1]["chosen"] and rows[2]["label"] is True
    assert rows[3]["completion"] == paired[1]["rejected"] and rows[3]["label"] is False
    assert rows[3]["prompt"] == paired[1]["prompt"]


@pytest.mark.parametrize(
    ("method", "block", "key", "value"),
    [
        ("dpo", "dpo", "ld_alpha", 0.5),
        ("dpo", "trl", "label_smoothing", 0.1),
        ("ipo", "ipo", "use_weighting", True),
        ("simpo", "simpo", "alpha", 0.5),
    ],
)
def test_unmodelled_setting_is_refused(method: str, block: str, key: str, value: Any):
    """A TRL setting the held-out metrics do not model is refused in one line naming it."""
    base = TrainConfig(method=method)
    cfg = base.model_copy(update={block: {**getattr(base, block), key: value}})
    args = build_trl_config(cfg, seed=0, output_dir="/tmp/karma-unused")
    with pytest.raises(KarmaError) as err:
        check_heldout_modelled(cfg, args)
    assert f"train.{block}.{key}" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("method", list(OBJECTIVES))
def test_registry_config_builds(method: str):
    """Every entry's TRL config builds from the default params, with the fixed fields set."""
    obj = OBJECTIVES[method]
    args = build_trl_config(TrainConfig(method=method), seed=0, output_dir="/tmp/karma-unused")
    assert type(args).__name__ == obj.config.split(":")[1]
    assert args.bf16 is False
    for key, value in obj.fixed.items():
        assert getattr(args, key) == value, (method, key)
    for key, value in obj.defaults.items():
        assert getattr(args, key) == value, (method, key)


def test_fixed_field_is_refused_in_params():
    """The loss a method fixes cannot be changed from params (that is another entry)."""
    with pytest.raises(ValueError, match="loss_type"):
        TrainConfig(method="dpo", dpo={"loss_type": "hinge"})
    with pytest.raises(ValueError, match="cpo_alpha"):
        TrainConfig(simpo={"cpo_alpha": 1.0})


def test_bad_trl_value_names_its_key():
    """A value TRL rejects fails in one line naming the key (before any model loads)."""
    cfg = TrainConfig(method="simpo", simpo={"beta": "high"})
    with pytest.raises(KarmaError, match=r"train\.simpo\.beta"):
        build_trl_config(cfg, seed=0, output_dir="/tmp/karma-unused")
    cfg = TrainConfig(trl={**TrainConfig().trl, "lr_scheduler_type": "nope"})
    with pytest.raises(KarmaError, match=r"train\.trl\.lr_scheduler_type"):
        build_trl_config(cfg, seed=0, output_dir="/tmp/karma-unused")


def test_simpo_paper_recipe():
    """The SimPO authors' Llama-3-8B-Instruct v0.2 settings build a CPOConfig with SimPO's loss:
    beta 10, gamma 3 (gamma/beta 0.3), lr 1e-6, cosine, global batch 128 on 4 processes."""
    from tests.test_training import REPO

    recipe = str(REPO / "params/recipes/simpo-paper-gpu.yaml")
    cfg = apply_recipe(TrainConfig(method="simpo", recipe=recipe))
    args = build_trl_config(cfg, seed=0, output_dir="/tmp/karma-unused", world_size=4)
    assert type(args).__name__ == "CPOConfig"
    assert (args.loss_type, args.cpo_alpha, args.beta, args.simpo_gamma) == ("simpo", 0.0, 10, 3)
    assert args.simpo_gamma / args.beta == pytest.approx(0.3)
    assert args.learning_rate == 1e-6 and args.lr_scheduler_type == "cosine"
    assert args.warmup_steps == 0.1 and args.bf16 is True and args.max_length == 2048
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps * 4 == 128


# ------------------------------------------------------------------ stored reference log-probs


def test_stored_reference_replaces_the_reference_model(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
):  # fmt: skip
    """The reference stage's log-probs (TRL's precompute, stored) equal the live reference's;
    training with them loads no reference model and follows the live run."""
    import karma.training.train as train_mod
    from karma.params import Params
    from karma.training.reference import ReferencePaths, read_stored, run_reference, with_keys
    from karma.training.train import Stored

    out = tmp_path / "reference"
    params = Params(train=_config("dpo", 5))
    metrics = run_reference(params, ReferencePaths(data=pairs_file, base=tiny_model_dir,
                                                   eval_data=test_file, out=out))  # fmt: skip
    assert metrics["train.pairs"] == 16 and metrics["eval.pairs"] == 10
    stored = Stored(read_stored(out), out)
    loads = []
    real = train_mod.load_causal_lm
    monkeypatch.setattr(train_mod, "load_causal_lm",
                        lambda *a, **k: loads.append(a) or real(*a, **k))  # fmt: skip
    spec = OBJECTIVES["dpo"].heldout
    runs = {}
    for mode in ("live", "stored"):
        loads.clear()
        trainer = make_trainer(
            params.train, tiny_model_dir, seed=0, output_dir=tmp_path / mode,
            dataset=with_keys(load_pairs(pairs_file)),
            eval_dataset=with_keys(load_pairs(test_file)),
            stored=stored if mode == "stored" else None,
        )  # fmt: skip
        assert len(loads) == (1 if mode == "stored" else 2)  # no reference model when stored
        assert (trainer.ref_model is None) == (mode == "stored")
        ref = heldout_logps(trainer, spec, reference=True)
        runs[mode] = (ref, trainer.train().training_loss, _moved(trainer, tiny_model_dir))
    (live_ref, live_loss, _), (ref, loss, moved) = runs["live"], runs["stored"]
    np.testing.assert_allclose(ref.policy, live_ref.policy, atol=1e-4)
    print(
        f"stored - live reference: max {np.abs(ref.policy - live_ref.policy).max():.2e}; "
        f"train loss {loss:.6f} vs {live_loss:.6f}"
    )
    np.testing.assert_array_equal(ref.counts, live_ref.counts)
    assert math.isfinite(loss) and loss == pytest.approx(live_loss, rel=1e-4) and moved > 10


def test_stored_reference_of_the_dev_pairs(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, dev_file: Path, tmp_path: Path
):
    """The reference stage stores the dev pairs' log-probs too (dev.parquet); a trainer whose
    held-out set holds test and dev pairs attaches both."""
    from karma.params import Params
    from karma.training.reference import ReferencePaths, read_stored, run_reference, with_keys
    from karma.training.train import Stored

    out = tmp_path / "reference"
    params = Params(train=_config("dpo", 5))
    metrics = run_reference(params, ReferencePaths(data=pairs_file, base=tiny_model_dir,
                                                   eval_data=test_file, dev_data=dev_file,
                                                   out=out))  # fmt: skip
    assert (metrics["train.pairs"], metrics["eval.pairs"], metrics["dev.pairs"]) == (16, 10, 8)
    stored = read_stored(out)
    held = tagged({"test": with_keys(load_pairs(test_file)),
                   "dev": with_keys(load_pairs(dev_file))})  # fmt: skip
    trainer = make_trainer(params.train, tiny_model_dir, seed=0, output_dir=tmp_path / "ck",
                           dataset=with_keys(load_pairs(pairs_file)), eval_dataset=held,
                           stored=Stored(stored, out))  # fmt: skip
    spec = OBJECTIVES["dpo"].heldout
    dev = heldout_logps(trainer, spec, reference=True, part="dev").policy
    keys = list(with_keys(load_pairs(dev_file))["pair_sha"])
    np.testing.assert_allclose(dev, [stored["dev"][k] for k in keys], rtol=0, atol=1e-6)
    live = heldout_logps(trainer, spec, part="dev").policy  # the policy = the base: the same
    np.testing.assert_allclose(dev, live, atol=1e-4)
    # dev pairs alone (choosing a recipe without scoring the test pairs)
    only = make_trainer(
        params.train,
        tiny_model_dir,
        seed=0,
        output_dir=tmp_path / "ck2",
        dataset=with_keys(load_pairs(pairs_file)),
        eval_dataset=tagged({"dev": with_keys(load_pairs(dev_file))}),
        stored=Stored({"train": stored["train"], "dev": stored["dev"]}, out),
    )
    alone = heldout_logps(only, spec, reference=True, part="dev").policy
    np.testing.assert_array_equal(alone, dev)


def test_stored_reference_must_match_the_pairs(
    tiny_model_dir: Path, pairs_file: Path, tmp_path: Path
):
    """Stored log-probs of other pairs fail in one line; kto cannot use them."""
    from karma.params import Params
    from karma.training.reference import ReferencePaths, run_reference
    from karma.training.train import TrainPaths, run_train

    out = tmp_path / "reference"
    other = tmp_path / "other.parquet"
    make_pairs(4, seed=3, offset=50).write_parquet(other)
    run_reference(Params(train=_config("dpo", 5)),
                  ReferencePaths(data=other, base=tiny_model_dir, out=out))  # fmt: skip
    paths = TrainPaths(data=pairs_file, base=tiny_model_dir, out=tmp_path / "policy",
                       checkpoints=tmp_path / "ck", reference_logps=out)  # fmt: skip
    cfg = _config("dpo", 5).model_copy(update={"reference": "stored"})
    with pytest.raises(KarmaError, match="no stored reference log-probs for 16 of 16 pairs"):
        run_train(Params(train=cfg), paths)
    kto = cfg.model_copy(update={"method": "kto"})
    with pytest.raises(KarmaError, match=r"'train\.reference': stored reference log-probs are"):
        run_train(Params(train=kto), paths)


def test_stage_records_the_method(
    tiny_model_dir: Path, pairs_file: Path, test_file: Path, tmp_path: Path
):
    """The stage with a reference-free objective: its own held-out metrics, the method in the
    metrics, the provenance and the model card."""
    import json

    from karma.core.lm import PROVENANCE
    from karma.params import Params
    from karma.training.train import TrainPaths, run_train

    paths = TrainPaths(data=pairs_file, base=tiny_model_dir, eval_data=test_file,
                       out=tmp_path / "policy", checkpoints=tmp_path / "ck",
                       metrics=tmp_path / "m.json")  # fmt: skip
    metrics = run_train(Params(train=_config("simpo", 5)), paths)
    assert metrics["meta.train_method"] == "simpo" and math.isfinite(metrics["train_loss"])
    assert {"heldout.after.loss", "heldout.delta.reward_margin"} <= set(metrics)
    # reference-free: the "before" rewards are the base model's own, not DPO's zeros
    assert metrics["heldout.before.reward_margin"] != 0.0
    assert json.loads((tmp_path / "m.json").read_text())["meta.train_method"] == "simpo"
    prov = json.loads((tmp_path / "policy" / PROVENANCE).read_text())
    assert prov["method"] == "simpo"
    card = (tmp_path / "policy" / "README.md").read_text()
    assert "SimPO (TRL CPOTrainer" in card and "| loss |" in card
