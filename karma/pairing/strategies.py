"""The pairing strategies, one table: name, kernel code, kind, card text and the plain-Python rule.

Everything else derives from :data:`SPECS`: the ``kinship`` setting's choices and help
(:mod:`karma.pairing.settings`), the kernel's strategy codes (:mod:`karma.pairing.kernel`), the
dataset card's "made by" line and which strategies tau constrains (:mod:`karma.pairing.card`).
Adding a strategy is one :class:`StrategySpec` entry here (its rule, in plain Python, is the
reference the kernel is tested against) plus its branch in :mod:`karma.pairing.kernel`.

This module imports nothing heavy: the settings read it when the CLI starts.

>>> [s.name for s in SPECS], spec("sim").code, KARMA_STRATEGIES
(['score', 'sim', 'score_sim', 'rlaif', 'random'], 1, ('score', 'sim', 'score_sim'))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from karma.core.errors import KarmaError, did_you_mean

#: Instance rating fields of a completion (the rlaif baseline and the agreement metric).
RATING_FIELDS = ("overall_score", "fine_grained_score")
#: Which responses ``rlaif`` may pair (``preferences.baseline_pool``).
POOLS = ("scored", "all")


@dataclass(frozen=True)
class Case:
    """One instruction as the plain-Python rules see it (built by
    :func:`karma.pairing.reference.reference_pair`).

    ``cands``: positions of the candidate completions (in record order); ``sp``: S_pref per
    position (None when the model has none); ``draw``: the instruction's random number of the
    strategy's stream; ``rating``: the rating field of ``rlaif``.
    """

    completions: Sequence[Mapping[str, Any]]
    cands: list[int]
    sp: dict[int, float | None]
    kinship: Mapping[tuple[str, str], float]
    tau: float
    draw: int
    rating: str

    def kin(self, p: int, q: int) -> float:
        """Kinship of the models of positions ``p`` and ``q`` (NaN when unknown)."""
        key = (self.completions[p]["model"], self.completions[q]["model"])
        v = self.kinship.get(key, math.nan)
        return math.nan if v is None else v

    def eligible(self, p: int, q: int) -> bool:
        """Two different models that are kin (kinship >= tau; NaN is never kin)."""
        if self.completions[p]["model"] == self.completions[q]["model"]:
            return False
        return self.kin(p, q) >= self.tau

    def pairs(self) -> list[tuple[int, int]]:
        """Every candidate pair ``(p, q)``, p before q, in record order."""
        return [(p, q) for k, p in enumerate(self.cands) for q in self.cands[k + 1 :]]

    def eligible_pairs(self) -> list[tuple[int, int]]:
        return [(p, q) for p, q in self.pairs() if self.eligible(p, q)]


#: A rule: the pair ``(a, b)`` it picks (ordered by S_pref afterwards unless the spec says the
#: rule orders it) or the reason it drops the instruction.
Rule = Callable[[Case], "tuple[int, int] | str"]


def _score(case: Case) -> tuple[int, int] | str:
    """The eligible pair with the highest mean S_pref; ties -> higher kinship -> first met."""
    elig = case.eligible_pairs()
    if not elig:
        return "no_eligible_pair"
    sp = case.sp
    return max(elig, key=lambda pq: (sp[pq[0]] + sp[pq[1]], case.kin(*pq), -pq[0], -pq[1]))  # type: ignore[operator]


def _sim(case: Case) -> tuple[int, int] | str:
    """The eligible pair with the highest kinship; ties -> higher mean S_pref -> first met."""
    elig = case.eligible_pairs()
    if not elig:
        return "no_eligible_pair"
    sp = case.sp
    return max(elig, key=lambda pq: (case.kin(*pq), sp[pq[0]] + sp[pq[1]], -pq[0], -pq[1]))  # type: ignore[operator]


def _score_sim(case: Case) -> tuple[int, int] | str:
    """The highest-S_pref candidate with an eligible partner (ties -> first), paired with its
    most-kin eligible partner (ties -> higher S_pref -> first)."""
    elig = case.eligible_pairs()
    if not elig:
        return "no_eligible_pair"
    sp = case.sp
    a = max(sorted({x for pq in elig for x in pq}), key=lambda i: (sp[i], -i))
    partners = [q for q in case.cands if q != a and case.eligible(a, q)]
    return a, max(partners, key=lambda q: (case.kin(a, q), sp[q], -q))


def _rlaif(case: Case) -> tuple[int, int] | str:
    """chosen = the highest rating (ties -> first); rejected = a seeded-random one of the
    candidates rated strictly lower (none: ``tie``)."""
    r = case.rating
    best = max(case.cands, key=lambda i: (case.completions[i][r], -i))
    top = case.completions[best][r]
    lower = [i for i in case.cands if case.completions[i][r] < top]
    if not lower:
        return "tie"
    return best, lower[case.draw % len(lower)]


def _random(case: Case) -> tuple[int, int] | str:
    """A seeded-random pair of candidates (kinship ignored)."""
    pairs = case.pairs()
    return pairs[case.draw % len(pairs)]


@dataclass(frozen=True)
class StrategySpec:
    """One pairing strategy.

    ``code``: its number in the kernel (its row in :data:`SPECS`); ``kind``: the group named
    in the setting's help (``KARMA`` strategies are constrained by tau); ``candidates``:
    ``scored`` (non-blank responses of models with an S_pref) or ``rated`` (non-blank rated
    responses, of scored models or of any under ``baseline_pool: all``); ``rule_orders``: the
    rule returns (chosen, rejected) itself, else the higher S_pref is chosen and equal S_pref
    drops ``tie``; ``card``: the card's "made by" text (``{name}``, ``{tau}`` are filled in).
    """

    name: str
    code: int
    kind: str
    rule: Rule
    card: str
    candidates: str = "scored"
    rule_orders: bool = False

    @property
    def karma(self) -> bool:
        """A KARMA strategy: pairs only kin models, so tau changes its pairs."""
        return self.kind == "KARMA"


_KARMA_CARD = (
    "KARMA kinship-aware pairing (strategy `{name}`): responses are paired only between kin "
    "models (kinship >= {tau:g}); the response of the model with the higher normalised "
    "benchmark score S_pref is chosen"
)

#: The strategies, in kernel-code order.
SPECS: tuple[StrategySpec, ...] = (
    StrategySpec("score", 0, "KARMA", _score, _KARMA_CARD),
    StrategySpec("sim", 1, "KARMA", _sim, _KARMA_CARD),
    StrategySpec("score_sim", 2, "KARMA", _score_sim, _KARMA_CARD),
    StrategySpec(
        "rlaif", 3, "AI-feedback baseline", _rlaif,
        "instance-wise AI-feedback binarisation (chosen = highest rating, rejected = a "
        "seeded-random lower-rated response), as `HuggingFaceH4/ultrafeedback_binarized`",
        candidates="rated", rule_orders=True,
    ),
    StrategySpec(
        "random", 4, "ablation", _random,
        "a seeded-random pair of responses ordered by S_pref (ablation, kinship ignored)",
    ),
)  # fmt: skip
assert [s.code for s in SPECS] == list(range(len(SPECS))), "codes are the table's rows"

STRATEGIES: tuple[str, ...] = tuple(s.name for s in SPECS)
#: The KARMA strategies (the ones tau constrains).
KARMA_STRATEGIES: tuple[str, ...] = tuple(s.name for s in SPECS if s.karma)
_BY_NAME = {s.name: s for s in SPECS}


def spec(strategy: str) -> StrategySpec:
    """The spec of a strategy (KarmaError naming the choices)."""
    found = _BY_NAME.get(strategy)
    if found is None:
        raise KarmaError(
            f"unknown pairing strategy{did_you_mean(strategy, STRATEGIES)}",
            field="kinship",
            value=strategy,
            expected=" | ".join(STRATEGIES),
        )
    return found


def strategy_code(strategy: str) -> int:
    """The kernel's code of a pairing strategy (KarmaError naming the choices)."""
    return spec(strategy).code


def strategy_help() -> str:
    """The ``kinship`` setting's help: the strategies grouped by kind."""
    groups: list[tuple[str, list[str]]] = []
    for s in SPECS:
        if groups and groups[-1][0] == s.kind:
            groups[-1][1].append(s.name)
        else:
            groups.append((s.kind, [s.name]))
    choices = " | ".join(f"{' | '.join(names)} ({kind})" for kind, names in groups)
    return f"pairing strategy: {choices}; dvc exp run -S kinship=sim"


def made_by(strategy: str, tau: float) -> str:
    """The card's sentence on how the pairs were made."""
    return spec(strategy).card.format(name=strategy, tau=tau)
