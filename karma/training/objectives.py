"""The training-method registry: one entry per TRL objective.

An :class:`Objective` names the TRL config and trainer classes (imported only when used), the
data shape the trainer reads (``paired`` prompt / chosen / rejected, ``unpaired`` prompt /
completion / label made by TRL's own ``unpair_preference_dataset``, ``sft`` prompt /
completion), whether it trains against a reference model, the TRL fields karma fixes for it
(``loss_type`` ...), the default of its ``train.<name>`` params block, and its held-out
preference metrics (:class:`HeldoutSpec`): how the per-pair log-probs are read from the
trainer's tokenized held-out set and which per-pair metrics follow from them, with the key of
the trainer's own ``evaluate()`` each one must reproduce (checked in the tests).

Adding an objective is one entry in :data:`OBJECTIVES` (and its test case): the ``train.method``
choices, its ``train.<name>`` block, the data, the trainer, the card and the held-out metrics
all derive from it.

>>> sorted(OBJECTIVES) == sorted(NAMES)
True
>>> OBJECTIVES["simpo"].reference, OBJECTIVES["simpo"].fixed
(False, {'loss_type': 'simpo', 'cpo_alpha': 0.0})
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Shape = Literal["paired", "unpaired", "sft"]
#: How a trainer tokenizes held-out pairs: TRL's DPO layout (prompt_ids / chosen_ids /
#: rejected_ids), the CPO / ORPO layout (chosen_input_ids / chosen_labels ...), or KTO's
#: unpaired rows (prompt_ids / completion_ids, chosen and rejected interleaved).
Tokens = Literal["dpo", "cpo", "kto"]


@dataclass(frozen=True)
class PairLogps:
    """Summed completion log-probs ``(n, 2)`` (chosen, rejected) of held-out pairs under the
    policy, their completion token counts, and the reference model's sums (or None)."""

    policy: np.ndarray
    counts: np.ndarray
    reference: np.ndarray | None = None

    @property
    def mean(self) -> np.ndarray:
        """Length-normalised (token-averaged) log-probs of the policy."""
        return self.policy / np.maximum(self.counts, 1)


Metrics = Callable[[PairLogps, Any], dict[str, np.ndarray]]


@dataclass(frozen=True)
class HeldoutSpec:
    """The held-out preference metrics of an objective.

    ``compute(logps, trl_args)`` returns per-pair arrays, one per name in ``metrics``;
    ``trl_keys`` maps each metric whose pair mean equals a key of the trainer's ``evaluate()``
    to that key; ``modelled`` are TRL fields whose value the metrics assume (any other value
    is refused, not mislabelled).
    """

    tokens: Tokens
    metrics: tuple[str, ...]
    compute: Metrics
    trl_keys: Mapping[str, str]
    modelled: Mapping[str, Any] = field(default_factory=dict)
    definition: str = ""


@dataclass(frozen=True)
class Objective:
    """One training method: what TRL runs and what karma reports about it."""

    name: str
    summary: str  # the card's "Method" line
    config: str  # "module:Class" of the TRL config
    trainer: str  # "module:Class" of the TRL trainer
    shape: Shape
    reference: bool  # trains against a frozen reference model
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the train.<name> block
    fixed: Mapping[str, Any] = field(default_factory=dict)  # set by karma, not by params
    heldout: HeldoutSpec | None = None

    def config_class(self) -> type:
        return _load(self.config)

    def trainer_class(self) -> type:
        return _load(self.trainer)


def _load(ref: str) -> Any:
    """``"module:Name"`` -> the object (TRL's experimental trainers without their warning)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------ per-pair metrics


def _rewards(chosen: np.ndarray, rejected: np.ndarray) -> dict[str, np.ndarray]:
    margin = chosen - rejected
    return {"reward_accuracy": (chosen > rejected).astype(float), "reward_margin": margin}


def _ref_rewards(lp: PairLogps, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """TRL's implicit rewards ``beta * (logp - ref_logp)`` (summed over the completion)."""
    assert lp.reference is not None, "a reference-model objective needs reference log-probs"
    ratio = lp.policy - lp.reference
    return beta * ratio[:, 0], beta * ratio[:, 1]


def dpo_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """DPO (sigmoid): rewards ``beta * (logp - ref_logp)``, loss ``-log sigmoid(margin)``.

    >>> lp = PairLogps(np.array([[-1.0, -3.0]]), np.ones((1, 2)), np.array([[-2.0, -2.0]]))
    >>> m = dpo_metrics(lp, type("A", (), {"beta": 0.5}))
    >>> float(m["reward_margin"][0]), float(m["reward_accuracy"][0])
    (1.0, 1.0)
    """
    chosen, rejected = _ref_rewards(lp, args.beta)
    out = _rewards(chosen, rejected)
    return {"loss": np.logaddexp(0.0, -out["reward_margin"]), **out}


def ipo_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """IPO as TRL computes it: ``((dc / nc - dr / nr) - 1 / (2 beta))^2`` on the token-averaged
    log-ratios; rewards and margin as DPO's."""
    chosen, rejected = _ref_rewards(lp, args.beta)
    assert lp.reference is not None
    avg = (lp.policy - lp.reference) / np.maximum(lp.counts, 1)
    loss = (avg[:, 0] - avg[:, 1] - 1.0 / (2.0 * args.beta)) ** 2
    return {"loss": loss, **_rewards(chosen, rejected)}


def simpo_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """SimPO (reference-free): rewards ``beta * mean logp``, loss
    ``-log sigmoid(beta * (mean_c - mean_r) - gamma)``."""
    mean = lp.mean
    chosen, rejected = args.beta * mean[:, 0], args.beta * mean[:, 1]
    out = _rewards(chosen, rejected)
    return {"loss": np.logaddexp(0.0, -(out["reward_margin"] - args.simpo_gamma)), **out}


def cpo_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """CPO (sigmoid, reference-free): rewards ``beta * logp`` (summed); the preference term of
    the loss ``-log sigmoid(margin)`` (TRL's loss adds a batch-level NLL term)."""
    chosen, rejected = args.beta * lp.policy[:, 0], args.beta * lp.policy[:, 1]
    out = _rewards(chosen, rejected)
    return {"preference_loss": np.logaddexp(0.0, -out["reward_margin"]), **out}


def _log1mexp(x: np.ndarray) -> np.ndarray:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends."""
    return np.where(x > -np.log(2.0), np.log(-np.expm1(x)), np.log1p(-np.exp(x)))


def orpo_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """ORPO (reference-free): rewards ``beta * mean logp``; the log odds ratio of chosen over
    rejected ``log odds(mean_c) - log odds(mean_r)`` (TRL logs its mean as ``log_odds_chosen``)."""
    mean = lp.mean
    chosen, rejected = args.beta * mean[:, 0], args.beta * mean[:, 1]
    log_odds = (mean[:, 0] - mean[:, 1]) - (_log1mexp(mean[:, 0]) - _log1mexp(mean[:, 1]))
    return {"log_odds": log_odds, **_rewards(chosen, rejected)}


def kto_metrics(lp: PairLogps, args: Any) -> dict[str, np.ndarray]:
    """KTO's implicit rewards ``beta * (logp - ref_logp)`` on each pair's two rows; no per-pair
    loss (KTO's loss depends on a batch-level KL estimate)."""
    return _rewards(*_ref_rewards(lp, args.beta))


_REWARD_KEYS = {"reward_accuracy": "eval_rewards/accuracies",
                "reward_margin": "eval_rewards/margins"}  # fmt: skip
_DPO_MODELLED = {"ld_alpha": None, "f_divergence_type": "reverse_kl", "label_smoothing": 0.0,
                 "use_weighting": False, "loss_weights": None}  # fmt: skip
_CPO_MODELLED = {"alpha": 0.0, "label_smoothing": 0.0}

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective(
            "dpo", "DPO (TRL DPOTrainer, explicit reference model)",
            "trl:DPOConfig", "trl:DPOTrainer", "paired", True,
            defaults={"beta": 0.1}, fixed={"loss_type": ["sigmoid"]},
            heldout=HeldoutSpec("dpo", ("loss", "reward_accuracy", "reward_margin"), dpo_metrics,
                                {"loss": "eval_loss", **_REWARD_KEYS}, _DPO_MODELLED,
                                "rewards beta*(logp - ref_logp); loss -log sigmoid(margin)"),
        ),
        Objective(
            "ipo", "IPO (TRL DPOTrainer, loss_type ipo, explicit reference model)",
            "trl:DPOConfig", "trl:DPOTrainer", "paired", True,
            defaults={"beta": 0.1}, fixed={"loss_type": ["ipo"]},
            heldout=HeldoutSpec("dpo", ("loss", "reward_accuracy", "reward_margin"), ipo_metrics,
                                {"loss": "eval_loss", **_REWARD_KEYS}, _DPO_MODELLED,
                                "rewards beta*(logp - ref_logp); loss (mean log-ratio gap "
                                "- 1/(2 beta))^2"),
        ),
        Objective(
            "simpo", "SimPO (TRL CPOTrainer, loss_type simpo, cpo_alpha 0, no reference model)",
            "trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer", "paired", False,
            defaults={"beta": 2.0, "simpo_gamma": 1.0}, fixed={"loss_type": "simpo",
                                                               "cpo_alpha": 0.0},
            heldout=HeldoutSpec("cpo", ("loss", "reward_accuracy", "reward_margin"),
                                simpo_metrics, {"loss": "eval_loss", **_REWARD_KEYS},
                                _CPO_MODELLED, "rewards beta*mean logp; loss -log sigmoid("
                                "margin - gamma)"),
        ),
        Objective(
            "cpo", "CPO (TRL CPOTrainer, sigmoid loss + NLL, no reference model)",
            "trl.experimental.cpo:CPOConfig", "trl.experimental.cpo:CPOTrainer", "paired", False,
            defaults={"beta": 0.1}, fixed={"loss_type": "sigmoid"},
            heldout=HeldoutSpec("cpo", ("preference_loss", "reward_accuracy", "reward_margin"),
                                cpo_metrics, _REWARD_KEYS, _CPO_MODELLED,
                                "rewards beta*logp; preference loss -log sigmoid(margin)"),
        ),
        Objective(
            "orpo", "ORPO (TRL ORPOTrainer, NLL + odds-ratio loss, no reference model)",
            "trl.experimental.orpo:ORPOConfig", "trl.experimental.orpo:ORPOTrainer", "paired",
            False, defaults={"beta": 0.1},
            heldout=HeldoutSpec("cpo", ("log_odds", "reward_accuracy", "reward_margin"),
                                orpo_metrics, {"log_odds": "eval_log_odds_chosen",
                                               **_REWARD_KEYS},
                                definition="rewards beta*mean logp; log odds ratio"),
        ),
        Objective(
            "kto", "KTO (TRL KTOTrainer on the pairs unpaired, explicit reference model)",
            "trl:KTOConfig", "trl:KTOTrainer", "unpaired", True,
            defaults={"beta": 0.1}, fixed={"loss_type": "kto"},
            heldout=HeldoutSpec("kto", ("reward_accuracy", "reward_margin"), kto_metrics,
                                {"reward_margin": "eval_rewards/margins"},
                                definition="rewards beta*(logp - ref_logp) of each pair's rows"),
        ),
        Objective(
            "sft", "SFT on prompt + chosen (TRL SFTTrainer)", "trl:SFTConfig", "trl:SFTTrainer",
            "sft", False,
        ),
    )
}  # fmt: skip
NAMES = tuple(OBJECTIVES)


def objective(name: str) -> Objective:
    """The registry entry of ``train.method`` (validated by the settings)."""
    return OBJECTIVES[name]
