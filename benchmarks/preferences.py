"""Benchmark: the ``preferences`` stage vs a plain per-record Python loop with the same rules.

Generates UltraFeedback-shaped Parquet (N instructions x 4 completions from the 16 origin models
plus an unknown one; ~150-character responses; a few blank responses, "N/A" ratings and
duplicated texts), then times, from the Parquet file to the written pairs Parquet:

* **stage**: :func:`karma.ultrafeedback.read_ultrafeedback` + :func:`karma.preferences.make_pairs`
  (polars + the Numba kernel) + :func:`karma.preferences.write_pairs`;
* **loop**: what a typical script does: rows as dicts, a per-record Python loop applying the
  same rules (:func:`karma.preferences.reference_pair`), rows collected into a frame and written.

Each timing runs in a fresh subprocess (so peak memory, ``ru_maxrss``, is per run). At 1M the
loop is timed on the first 100k records and extrapolated linearly.

    python -m benchmarks.preferences                 # 64k and 1M
    python -m benchmarks.preferences --sizes 64000   # quicker
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

from tests.fixtures import synthetic_records

REPO = Path(__file__).resolve().parents[1]
SCORES = REPO / "data/origin/scores.csv"


def _kinship() -> tuple[pl.DataFrame, pl.DataFrame]:
    from karma.kinship import compute_kinship
    from karma.scores import read_scores

    res = compute_kinship(read_scores(SCORES))
    return res.models, res.kinship


def run_stage(data: Path, out: Path, strategy: str, repeat: int = 3) -> dict:
    """The vectorised path: Parquet in, pairs Parquet out."""
    from karma.preferences import make_pairs, write_pairs
    from karma.ultrafeedback import read_ultrafeedback

    models, kin = _kinship()
    # load the Numba kernels from their cache outside the timing (a real run pays this once)
    from karma.ultrafeedback import from_records

    comps = [{"model": "gpt-4", "response": "x"}, {"model": "bard", "response": "y"}]
    warm = from_records([("w", {"instruction": "w", "completions": comps})], file="warm")
    make_pairs(warm, models.select("model", "s_pref"), kin, strategy=strategy)
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        uf = read_ultrafeedback(data)
        t1 = time.perf_counter()
        res = make_pairs(uf, models.select("model", "s_pref"), kin, strategy=strategy, seed=0)
        t2 = time.perf_counter()
        write_pairs(res, out)
        t3 = time.perf_counter()
        runs.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2))
        del uf, res
    med = sorted(runs)[len(runs) // 2]
    return {
        "seconds": med[0],
        "first": runs[0][0],
        "read": med[1],
        "pair": med[2],
        "write": med[3],
        "pairs": pl.read_parquet(out).height,
        "records": n_records(data),
    }


def n_records(path: Path) -> int:
    return pl.scan_parquet(path).select(pl.len()).collect().item()


def run_loop(data: Path, out: Path, strategy: str, limit: int | None) -> dict:
    """A plain per-record Python loop with the same rules."""
    import hashlib

    from karma.preferences import PARQUET_COMPRESSION, reference_pair

    models, kin = _kinship()
    t0 = time.perf_counter()
    records = pl.read_parquet(data, n_rows=limit).to_dicts()
    s_pref = dict(zip(models["model"].to_list(), models["s_pref"].to_list(), strict=True))
    kinship = {(a, b): v for a, b, v in kin.select("model_a", "model_b", "kinship").iter_rows()}
    rows = []
    for i, rec in enumerate(records):
        comps = []
        for c in rec["completions"]:
            comps.append({**c, "model": c["model"].strip().lower()})
        a, b, why = reference_pair(
            comps, s_pref, kinship, strategy=strategy, tau=0.1, seed=0, row=i
        )
        if why != "kept":
            continue
        ca, cb = comps[a], comps[b]
        rows.append(
            {
                "prompt": [{"role": "user", "content": rec["instruction"]}],
                "chosen": [{"role": "assistant", "content": ca["response"]}],
                "rejected": [{"role": "assistant", "content": cb["response"]}],
                "prompt_id": hashlib.sha256(rec["instruction"].encode()).hexdigest(),
                "chosen_model": ca["model"],
                "rejected_model": cb["model"],
                "kinship": kinship.get((ca["model"], cb["model"])),
                "s_pref_chosen": s_pref.get(ca["model"]),
                "s_pref_rejected": s_pref.get(cb["model"]),
                "chosen_rating": ca["overall_score"],
                "rejected_rating": cb["overall_score"],
                "source": rec.get("source"),
            }
        )
    pl.DataFrame(rows).write_parquet(out, compression=PARQUET_COMPRESSION, statistics=False)
    t1 = time.perf_counter()
    return {"seconds": t1 - t0, "pairs": len(rows), "records": len(records)}


def _peak_rss_gib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited at fork)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(args: argparse.Namespace) -> None:
    if args.child == "stage":
        out = run_stage(Path(args.data), Path(args.out), args.strategy, args.repeat)
    else:
        out = run_loop(Path(args.data), Path(args.out), args.strategy, args.limit)
    out["max_rss_gib"] = _peak_rss_gib()
    print(json.dumps(out))


def _spawn(
    kind: str, data: Path, out: Path, strategy: str, limit: int | None = None, repeat: int = 0
) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.preferences",
        "--child",
        kind,
        "--data",
        str(data),
        "--out",
        str(out),
        "--strategy",
        strategy,
    ]
    if limit:
        cmd += ["--limit", str(limit)]
    if repeat:
        cmd += ["--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64000,1000000")
    ap.add_argument("--strategy", default="score")
    ap.add_argument(
        "--loop-limit",
        type=int,
        default=100_000,
        help="above this many records the loop is timed on a prefix and scaled",
    )
    ap.add_argument("--child", choices=["stage", "loop"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--repeat", type=int, default=3, help="stage runs per size (median)")
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    with tempfile.TemporaryDirectory(prefix="karma-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for n in (int(s) for s in args.sizes.split(",")):
            data = tmp / f"uf_{n}.parquet"
            t = time.perf_counter()
            synthetic_records(n, data)
            print(
                f"\n== {n:,} instructions x 4 completions "
                f"({data.stat().st_size / 2**20:.0f} MiB Parquet, made in "
                f"{time.perf_counter() - t:.1f} s), strategy {args.strategy}"
            )
            rep = args.repeat if n <= 100_000 else 1
            st = _spawn("stage", data, tmp / "stage.parquet", args.strategy, repeat=rep)
            print(
                f"stage: {st['seconds']:.2f} s, median of {rep} (first run {st['first']:.2f} s; "
                f"read+validate {st['read']:.2f}, pair "
                f"{st['pair']:.2f}, write {st['write']:.2f}); {st['pairs']:,} pairs; "
                f"peak RSS {st['max_rss_gib']:.2f} GiB"
            )
            limit = args.loop_limit if n > args.loop_limit else None
            lp = _spawn("loop", data, tmp / "loop.parquet", args.strategy, limit)
            scale = n / lp["records"]
            loop_s = lp["seconds"] * scale
            note = f" (timed on {lp['records']:,} records, x{scale:.0f})" if limit else ""
            print(f"loop:  {loop_s:.2f} s{note}; peak RSS {lp['max_rss_gib']:.2f} GiB")
            if not limit:
                cols = [
                    "prompt",
                    "chosen",
                    "rejected",
                    "chosen_model",
                    "rejected_model",
                    "kinship",
                    "chosen_rating",
                    "rejected_rating",
                ]
                same = (
                    pl.read_parquet(tmp / "stage.parquet")
                    .select(cols)
                    .equals(pl.read_parquet(tmp / "loop.parquet").select(cols))
                )
                print(f"same pairs as the loop: {same}")
            print(
                f"speed-up: {loop_s / st['seconds']:.1f}x"
                + (" (goal >= 20x at 64k)" if n <= 100_000 else "")
                + (
                    f"; memory goal < 8 GiB: {'met' if st['max_rss_gib'] < 8 else 'MISSED'}"
                    if n >= 1_000_000
                    else ""
                )
            )


if __name__ == "__main__":
    main()
