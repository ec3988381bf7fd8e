"""Pairing batch by batch: :class:`PairStream` pairs each batch, hands back its flat pairs
table and the split, and keeps only exact tallies; :func:`make_pairs` is the in-memory path
(one batch).

>>> import polars as pl
>>> from karma.pairing.ultrafeedback import from_records
>>> data = from_records([("line 1", {"instruction": "Hi", "completions": [
...     {"model": "a", "response": "x"}, {"model": "b", "response": "y"}]})], file="demo")
>>> s_pref = pl.DataFrame({"model": ["a", "b"], "s_pref": [0.2, 0.9]})
>>> kin = pl.DataFrame({"model_a": ["a", "b"], "model_b": ["b", "a"], "kinship": [0.5, 0.5]})
>>> res = make_pairs(data, s_pref, kin, strategy="score")
>>> res.pairs["chosen_model"].to_list(), res.counts["pairs"], res.metrics["diag.changed_by_tau"]
(['b'], 1, 0.0)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from karma.pairing.agreement import AgreementTally
from karma.pairing.kernel import KEPT, REASONS, same_pairs
from karma.pairing.layouts import FRAME_SCHEMA, arrow_float, arrow_text, trl_frame
from karma.pairing.pool import (
    Pool,
    Prepared,
    pair_model_counts,
    pool_counts,
    pool_stats,
    prepare,
    round6,
    search,
    used_stats,
)
from karma.pairing.split import DEV, SPLIT_NAMES, TEST, hash128, prompt_ids, split_codes
from karma.pairing.strategies import RATING_FIELDS, STRATEGIES, strategy_code
from karma.pairing.ultrafeedback import UltraFeedback

log = logging.getLogger(__name__)

#: Instructions per block of the diagnostics sample (:func:`diagnostic_runs`).
DIAG_BLOCK = 1024


def diagnostic_stride(total: int | None, limit: int | None) -> int:
    """Every how many blocks of :data:`DIAG_BLOCK` instructions the diagnostics search, so that
    about ``limit`` of ``total`` instructions are searched (1: all; also when ``total`` is not
    known in advance)."""
    if not total or limit is None or total <= limit:
        return 1
    return -(-total // max(limit, DIAG_BLOCK))


def diagnostic_runs(row0: int, n: int, stride: int) -> list[tuple[int, int]]:
    """The instructions of a batch (global rows ``row0`` to ``row0 + n - 1``) in the
    diagnostics sample, as ``(start, stop)`` runs of local indices: the blocks ``row //
    DIAG_BLOCK`` divisible by ``stride``. They depend only on the global rows, not on how the
    data was batched.

    >>> diagnostic_runs(1000, 3000, 2)  # rows 1000-3999: blocks 0 and 2 of 0-3
    [(0, 24), (1048, 2072)]
    """
    if stride == 1:
        return [(0, n)] if n else []
    runs = []
    first = row0 // DIAG_BLOCK
    for block in range(-(-first // stride) * stride, (row0 + n - 1) // DIAG_BLOCK + 1, stride):
        a = max(block * DIAG_BLOCK, row0) - row0
        b = min((block + 1) * DIAG_BLOCK, row0 + n) - row0
        if a < b:
            runs.append((a, b))
    return runs


@dataclass(frozen=True)
class PreferenceResult:
    """``pairs``: every pair as a TRL frame (see :data:`OUTPUT_COLUMNS`); ``codes``: the split
    of each pair's prompt (:func:`~karma.pairing.split.split_codes`); ``counts``: per-reason
    counts; ``metrics``: the flat metrics dict written for DVC (counts, agreement, diagnostics
    ``diag.*``, split)."""

    pairs: pl.DataFrame
    counts: dict[str, int]
    metrics: dict[str, Any]
    strategy: str
    tau: float
    seed: int
    codes: np.ndarray | None = None
    #: how often each (chosen_model, rejected_model) pair was used, names as written
    model_pairs: dict[tuple[str, str], int] = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> pl.DataFrame:
        """The pairs of ``train_prefs``, ``test_prefs`` or ``dev_prefs``."""
        codes = np.zeros(self.pairs.height, np.uint8) if self.codes is None else self.codes
        return self.pairs.filter(pl.Series(codes == SPLIT_NAMES.index(name)))


def flat_pairs(
    prep: Prepared,
    chosen: np.ndarray,
    rejected: np.ndarray,
    rating: str,
    prompt_hash: np.ndarray | None = None,
) -> Any:
    """The kept pairs (instruction order) as a flat Arrow table: ``prompt``, ``chosen``,
    ``rejected`` (texts), ``prompt_id`` and the metadata columns; :func:`layout_of` gives the
    written layouts. ``prompt_hash``: the :func:`hash128` of the kept prompts, if computed."""
    import pyarrow as pa

    comps = prep.data.completions
    kept = np.flatnonzero(chosen >= 0)
    ci, ri = chosen[kept], rejected[kept]
    sp_full = np.append(prep.s_pref, np.nan)  # index -1 -> NaN
    m = prep.pool.m
    kin_pad = np.full((m + 1, m + 1), np.nan)
    kin_pad[:-1, :-1] = prep.kin
    mc, mr = prep.model[ci], prep.model[ri]
    prompt_text = prep.data.prompts["instruction"].gather(kept)
    columns = {
        "prompt": arrow_text(prompt_text),
        "chosen": arrow_text(comps["response"].gather(ci)),
        "rejected": arrow_text(comps["response"].gather(ri)),
        "prompt_id": arrow_text(prompt_ids(prompt_text, prompt_hash)),
        "chosen_model": arrow_text(comps["model"].gather(ci)),
        "rejected_model": arrow_text(comps["model"].gather(ri)),
        "kinship": arrow_float(kin_pad[mc, mr]),
        "s_pref_chosen": arrow_float(sp_full[mc]),
        "s_pref_rejected": arrow_float(sp_full[mr]),
        "chosen_rating": arrow_float(prep.ratings[rating][ci]),
        "rejected_rating": arrow_float(prep.ratings[rating][ri]),
        "source": arrow_text(prep.data.prompts["source"].gather(kept)),
    }
    return pa.table(columns)


class PairStream:
    """Pair instructions batch by batch (:meth:`add`) and keep only exact, order-independent
    tallies (integer counts per model pair, per reason, per rating difference), so that the
    metrics of :meth:`result` are the same bytes however the data was batched, and memory does
    not grow with the number of instructions.

    ``diagnose``: also run the searches the diagnostics need (the strategy at tau = -inf and
    every other strategy at tau) and tally the pool (see :meth:`diagnostics`), on the blocks
    of instructions that ``diag_stride`` selects (:func:`diagnostic_runs`; 1: all).
    """

    def __init__(
        self,
        pool: Pool,
        *,
        strategy: str = "score",
        tau: float = 0.1,
        seed: int = 0,
        rating: str = "overall_score",
        aliases: Mapping[str, str] | None = None,
        baseline_pool: str = "scored",
        test_fraction: float = 0.2,
        dev_fraction: float = 0.15,
        diagnose: bool = True,
        diag_stride: int = 1,
    ) -> None:
        strategy_code(strategy)
        self.pool, self.strategy, self.tau, self.seed = pool, strategy, float(tau), seed
        self.rating, self.aliases, self.baseline_pool = rating, aliases, baseline_pool
        self.test_fraction, self.dev_fraction = test_fraction, dev_fraction
        self.diagnose, self.diag_stride = diagnose, diag_stride
        m1 = pool.m + 1
        self.reasons = np.zeros(len(REASONS), dtype=np.int64)
        self.counts = {"completions": 0, "completions_blank": 0, "completions_unknown_model": 0}
        self.used = np.zeros((m1, m1), dtype=np.int64)
        self.names: dict[tuple[str, str], int] = {}  # (chosen_model, rejected_model) as written
        self.diffs: dict[str, dict[float, int]] = {f: {} for f in RATING_FIELDS}
        self.test = self.dev = 0
        self.pool_counts = np.zeros((pool.m, pool.m), dtype=np.int64)
        self.changed = self.dropped = 0
        self.diag_n = self.diag_pairs = 0  # instructions and pairs in the diagnostics sample
        self.same = {s: 0 for s in STRATEGIES if s != strategy}
        self.agreement = AgreementTally()  # the strategy's pairs vs the instance rating
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="karma-diagnostics")
        self._pending: Future[Any] | None = None  # the last batch's diagnostics, running

    def add(self, data: UltraFeedback) -> tuple[Any, np.ndarray]:
        """Pair one batch; returns its flat pairs table (:func:`flat_pairs`) and the split code
        of each pair (:func:`~karma.pairing.split.split_codes`)."""
        prep = prepare(data, self.pool, aliases=self.aliases)
        kw = {"seed": self.seed, "rating": self.rating, "pool": self.baseline_pool}
        chosen, rejected, reason = search(prep, self.strategy, tau=self.tau, **kw)
        prompts = prep.data.prompts["instruction"].gather(np.flatnonzero(chosen >= 0))
        h = hash128(prompts)
        pairs = flat_pairs(prep, chosen, rejected, self.rating, h)
        codes = split_codes(prompts, seed=self.seed, test_fraction=self.test_fraction,
                            dev_fraction=self.dev_fraction, hashes=h)  # fmt: skip
        self.reasons += np.bincount(reason.astype(np.int64), minlength=len(REASONS))
        self.counts["completions"] += data.completions.height
        self.counts["completions_blank"] += int((~prep.nonempty).sum())
        self.counts["completions_unknown_model"] += int((prep.model < 0).sum())
        self.used += pair_model_counts(prep, chosen, rejected)
        names = pl.from_arrow(pairs.select(["chosen_model", "rejected_model"]))
        assert isinstance(names, pl.DataFrame)
        for row in names.group_by("chosen_model", "rejected_model").len().iter_rows():
            self.names[row[:2]] = self.names.get(row[:2], 0) + row[2]
        kept = chosen >= 0
        self.agreement.add(self.strategy, prep.ratings[self.rating], chosen, rejected)
        for f in RATING_FIELDS:
            d = prep.ratings[f][chosen[kept]] - prep.ratings[f][rejected[kept]]
            values, n = np.unique(d[~np.isnan(d)], return_counts=True)
            tally = self.diffs[f]
            for v, k in zip(values.tolist(), n.tolist(), strict=True):
                tally[v] = tally.get(v, 0) + k
        self.test += int((codes == TEST).sum())
        self.dev += int((codes == DEV).sum())
        if self.diagnose:  # on the other core, while the next batch is read and paired
            self._collect()
            runs = diagnostic_runs(prep.row0, prep.n, self.diag_stride)
            self.diag_n += sum(b - a for a, b in runs)
            self.diag_pairs += sum(int((chosen[a:b] >= 0).sum()) for a, b in runs)
            self._pending = self._worker.submit(self._diagnose, prep, chosen, rejected, kw, runs)
        return pairs, codes

    def _diagnose(
        self,
        prep: Prepared,
        chosen: np.ndarray,
        rejected: np.ndarray,
        kw: dict[str, Any],
        runs: list[tuple[int, int]],
    ) -> tuple[np.ndarray, int, int, dict[str, int]]:
        """The diagnostic searches on the sampled runs of one batch (the Numba kernels release
        the GIL): pool counts, changed and dropped by tau, and how often each other strategy
        makes the same pair."""
        counts = np.zeros_like(self.pool_counts)
        changed = dropped = 0
        same = dict.fromkeys(self.same, 0)
        for a, b in runs:
            part = prep if (a, b) == (0, prep.n) else prep.slice(a, b)
            lo = int(prep.offsets[a])
            c, r = chosen[a:b], rejected[a:b]
            c, r = np.where(c >= 0, c - lo, -1), np.where(r >= 0, r - lo, -1)
            counts += pool_counts(part)
            c0, r0, reason0 = search(part, self.strategy, tau=-math.inf, **kw)
            changed += int(((c != c0) | (r != r0)).sum())
            dropped += int(((c < 0) & (reason0 == KEPT)).sum())
            found = same_pairs(
                part.offsets, part.model, part.nonempty, part.ratings[self.rating], part.s_pref,
                part.kin, c, r, strategies=list(self.same), tau=self.tau, seed=self.seed,
                pool=self.baseline_pool, row0=part.row0,
            )  # fmt: skip
            for other, k in found.items():
                same[other] += k
        return counts, changed, dropped, same

    def _collect(self) -> None:
        """Add the previous batch's diagnostics (at most one batch is in flight)."""
        if self._pending is None:
            return
        counts, changed, dropped, same = self._pending.result()
        self._pending = None
        self.pool_counts += counts
        self.changed += changed
        self.dropped += dropped
        for other, n in same.items():
            self.same[other] += n

    def metrics(self) -> dict[str, Any]:
        """Counts, pair statistics, agreement with both rating fields, split and ``diag.*``."""
        n = int(self.reasons.sum())
        pairs = int(self.reasons[KEPT])
        out: dict[str, Any] = {"instructions": n, "pairs": pairs, **self.counts}
        out.update({f"drop_{r}": int(self.reasons[i]) for i, r in enumerate(REASONS) if i != KEPT})
        used = used_stats(self.pool, self.used)
        out.update({"strategy": self.strategy, "keep_rate": round6(pairs / max(n, 1)),
                    "mean_kinship": used["mean_kinship"],
                    "mean_s_pref_gap": used["mean_s_pref_gap"]})  # fmt: skip
        agree = {}
        for f in RATING_FIELDS:
            tally = sorted(self.diffs[f].items())
            nr = sum(k for _, k in tally)
            up = sum(k for v, k in tally if v > 0)
            tie = sum(k for v, k in tally if v == 0)
            agree[f] = {
                "rated_pairs": nr,
                "agree": round6(up / nr) if nr else None,
                "tie": round6(tie / nr) if nr else None,
                "disagree": round6((nr - up - tie) / nr) if nr else None,
                "mean_gap": round6(math.fsum(v * k for v, k in tally) / nr) if nr else None,
            }
        a = agree[self.rating]
        out.update({"rated_pairs": a["rated_pairs"], "rating_agree": a["agree"],
                    "rating_tie": a["tie"], "rating_disagree": a["disagree"],
                    "mean_rating_gap": a["mean_gap"],
                    "distinct_model_pairs": len(self.names)})  # fmt: skip
        for f, values in agree.items():
            out.update({f"rating.{f}.{k}": v for k, v in values.items()})
        out.update({"split.train_pairs": pairs - self.test - self.dev,
                    "split.test_pairs": self.test,
                    "split.test_share": round6(self.test / max(pairs, 1)),
                    "split.dev_pairs": self.dev,
                    "split.dev_share": round6(self.dev / max(pairs, 1))})  # fmt: skip
        if self.diagnose:
            self._collect()
            out.update(self.diagnostics(used))
        return out

    def diagnostics(self, used: dict[str, Any]) -> dict[str, Any]:
        """What the kinship threshold did, as flat ``diag.*`` metrics.

        ``instructions``: how many instructions the diagnostics searched (all, or an even
        sample of blocks: :func:`diagnostic_runs`); every share below is of that sample.
        ``changed_by_tau``: share of instructions whose outcome (pair or drop) differs from the
        search without a threshold (tau = -inf: every candidate pair eligible);
        ``dropped_by_tau``: share paired without the threshold but dropped with it;
        ``overlap.<s>``: share of this strategy's pairs that strategy ``s`` also makes (same
        chosen and rejected response); ``used.*`` vs ``pool.*``: mean kinship and |S_pref gap| of
        the pairs used vs of every candidate pair, and the Spearman correlation of the two over
        the pool.
        """
        dn, dp = self.diag_n, self.diag_pairs
        out: dict[str, Any] = {
            "diag.instructions": dn,
            "diag.changed_by_tau": round6(self.changed / max(dn, 1)),
            "diag.changed_by_tau_n": self.changed,
            "diag.dropped_by_tau": round6(self.dropped / max(dn, 1)),
            "diag.dropped_by_tau_n": self.dropped,
        }
        for other, same in self.same.items():
            out[f"diag.overlap.{other}"] = round6(same / dp) if dp else None
        out.update(self.agreement.metrics())
        out["diag.used.mean_kinship"] = used["mean_kinship"]
        out["diag.used.mean_abs_s_pref_gap"] = used["mean_abs_s_pref_gap"]
        for k, v in pool_stats(self.pool, self.pool_counts).items():
            out[f"diag.pool.{k}"] = v
        return out

    def result(self, pairs: pl.DataFrame | None = None, codes: np.ndarray | None = None) -> Any:
        """The :class:`PreferenceResult` (``pairs``/``codes``: the collected frames, if kept)."""
        metrics = self.metrics()
        counts = {k: metrics[k] for k in ("instructions", "pairs", *self.counts)}
        counts.update({f"drop_{r}": metrics[f"drop_{r}"] for r in REASONS[1:]})
        frame = pl.DataFrame(schema=FRAME_SCHEMA) if pairs is None else pairs
        return PreferenceResult(frame, counts, metrics, self.strategy, self.tau, self.seed, codes,
                                self.names)  # fmt: skip


def warm_kernels() -> None:
    """Load every Numba kernel of a batch from its cache (numba's first load in a process
    initialises its compiler: about half a second, most of it in Python)."""
    from karma.pairing.ultrafeedback import from_records

    comps = [{"model": "a", "response": "x"}, {"model": "b", "response": "y"}]
    data = from_records([("warm-up", {"instruction": "w", "completions": comps})], file="warm")
    s_pref = pl.DataFrame({"model": ["a", "b"], "s_pref": [0.0, 1.0]})
    kin = pl.DataFrame({"model_a": ["a"], "model_b": ["b"], "kinship": [1.0]})
    try:
        PairStream(Pool.of(s_pref, kin), test_fraction=0.5).add(data)
    except Exception as err:  # the real batch meets (and reports) the same problem
        log.debug("warming the kernels failed: %s", err)


def warm_kernels_in_background() -> threading.Thread:
    """:func:`warm_kernels` in a daemon thread, so that the loading overlaps reading the first
    batch (a kernel called meanwhile waits for Numba's compiler lock, then runs)."""
    thread = threading.Thread(target=warm_kernels, name="karma-warm-kernels", daemon=True)
    thread.start()
    return thread


def make_pairs(
    data: UltraFeedback,
    s_pref: pl.DataFrame | Mapping[str, float],
    kinship: pl.DataFrame,
    *,
    strategy: str = "score",
    tau: float = 0.1,
    seed: int = 0,
    rating: str = "overall_score",
    aliases: Mapping[str, str] | None = None,
    pool: str = "scored",
    test_fraction: float = 0.2,
    dev_fraction: float = 0.15,
    diagnose: bool = True,
) -> PreferenceResult:
    """Pair every instruction of ``data`` by ``strategy`` (in memory: one batch of
    :class:`PairStream`); returns the TRL frame, the train/test/dev split, counts and metrics."""
    stream = PairStream(
        Pool.of(s_pref, kinship), strategy=strategy, tau=tau, seed=seed, rating=rating,
        aliases=aliases, baseline_pool=pool, test_fraction=test_fraction,
        dev_fraction=dev_fraction, diagnose=diagnose,
    )  # fmt: skip
    flat, codes = stream.add(data)
    log.info("%s: %d of %d instructions paired", strategy, flat.num_rows, len(data))
    return stream.result(trl_frame(flat), codes)
