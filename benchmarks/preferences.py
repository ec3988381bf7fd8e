"""Benchmark: the ``preferences`` stage vs a plain per-record Python loop with the same rules
(``--vs loop``), and the streaming stage vs the read + write floor (``--vs floor``).

Generates UltraFeedback-shaped Parquet (N instructions x 4 completions from the 16 origin models
plus an unknown one; ~150-character responses; a few blank responses, "N/A" ratings and
duplicated texts), then times, from the Parquet file to the written pairs Parquet:

* **stage**: :func:`karma.pairing.ultrafeedback.read_ultrafeedback` +
:func:`karma.pairing.stream.make_pairs`
  (polars + the Numba kernel) + :func:`karma.pairing.writers.write_pairs`;
* **loop**: what a typical script does: rows as dicts, a per-record Python loop applying
  the same rules (:func:`karma.pairing.reference.reference_pair`), rows collected into a
  frame and written.

Each timing runs in a fresh subprocess (so peak memory, ``ru_maxrss``, is per run). At 1M the
loop is timed on the first 100k records and extrapolated linearly.

    python -m benchmarks.preferences                 # 64k and 1M
    python -m benchmarks.preferences --sizes 64000   # quicker

``--vs floor`` (issue 13: bounded memory) runs the stage as the pipeline does
(:func:`karma.core.stage.execute` on the Parquet: records streamed in batches of
``preferences.batch_records``, both splits written as they come, diagnostics included) and, in
the same run, the floor: reading the same input with the same library (pyarrow record batches
of the same columns) and writing an output of the same size (the stage's three files, read back
and written again with the same writer). It reports time, peak memory (VmHWM of each child
process) and the ratio stage / floor; at the smallest size it also checks that the streamed
files are byte-identical to the in-memory path (make_pairs + write_splits) with other batch
sizes. The input is generated in chunks (so that 10M instructions fit while being written).

    python -m benchmarks.preferences --vs floor --sizes 100000,1000000,10000000
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
    from karma.kinship.kinship import compute_kinship
    from karma.kinship.scores import read_scores

    res = compute_kinship(read_scores(SCORES))
    return res.models, res.kinship


def run_stage(data: Path, out: Path, strategy: str, repeat: int = 3) -> dict:
    """The vectorised path: Parquet in, pairs Parquet out."""
    from karma.pairing.stream import make_pairs
    from karma.pairing.ultrafeedback import read_ultrafeedback
    from karma.pairing.writers import write_pairs

    models, kin = _kinship()
    # load the Numba kernels from their cache outside the timing (a real run pays this once)
    from karma.pairing.ultrafeedback import from_records

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

    from karma.pairing.reference import reference_pair
    from karma.pairing.writers import PARQUET_COMPRESSION

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


def make_data(n: int, path: Path, chunk: int = 250_000) -> None:
    """``n`` synthetic UltraFeedback records written chunk by chunk (memory ~ one chunk)."""
    import pyarrow.parquet as pq

    writer = None
    with tempfile.TemporaryDirectory(prefix="karma-gen-") as tmp:
        for i, start in enumerate(range(0, n, chunk)):
            part = Path(tmp) / "part.parquet"
            synthetic_records(min(chunk, n - start), part, seed=i)
            frame = pl.read_parquet(part).with_columns(
                pl.format(
                    "Instruction {}: explain the topic in a few sentences.",
                    pl.int_range(start, start + pl.len()),
                ).alias("instruction")
            )
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(str(path), table.schema, compression="snappy")
            writer.write_table(table, row_group_size=50_000)
    assert writer is not None
    writer.close()


def run_streaming(data: Path, out: Path, strategy: str) -> dict:
    """The stage as the pipeline runs it (streaming), timed end to end."""
    from karma.core.stage import execute
    from karma.kinship.kinship import STAGE as KINSHIP
    from karma.kinship.kinship import KinshipPaths
    from karma.pairing.preferences import STAGE, PreferencesPaths
    from karma.pairing.settings import PreferencesConfig
    from karma.params import Params

    kin = out.with_name("kinship")
    execute(KINSHIP, Params(), KinshipPaths(scores=SCORES, out=kin))
    # load the Numba kernels from their cache outside the timing (a real run pays this once)
    warm = out.with_name("warm.parquet")
    make_data(100, warm)
    warm_params = Params(kinship=strategy, preferences=PreferencesConfig(dataset=str(warm)))
    execute(STAGE, warm_params, PreferencesPaths(kinship_dir=kin, out=out.with_name("warm")))
    params = Params(kinship=strategy, preferences=PreferencesConfig(dataset=str(data)))
    t0 = time.perf_counter()
    metrics = execute(STAGE, params, PreferencesPaths(kinship_dir=kin, out=out))
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in out.glob("*.parquet"))
    return {"seconds": seconds, "pairs": metrics["pairs"], "out_bytes": size,
            "records": metrics["instructions"]}  # fmt: skip


def run_floor(data: Path, out: Path) -> dict:
    """Read the input as the stage does (the same frames of the same columns, by the same
    reader: :func:`karma.pairing.batching.parquet_frames`) and write an output of the same
    size with the same writer (the stage's files, read back batch by batch and written
    again)."""
    import pyarrow.parquet as pq

    from karma.pairing.batching import parquet_frames
    from karma.pairing.layouts import SPLITS
    from karma.pairing.writers import RowGroupWriter

    t0 = time.perf_counter()
    pf = pq.ParquetFile(data, pre_buffer=False)  # as the stage reads (bounded memory)
    rows = 0
    for frame in parquet_frames(pf, data, 100_000):
        rows += frame.height
    t1 = time.perf_counter()
    for name in SPLITS:  # every file the stage wrote (train, test, dev)
        src = pq.ParquetFile(out / f"{name}.parquet", pre_buffer=False)
        writer = RowGroupWriter(out.with_name(f"floor_{name}.parquet"), src.schema_arrow)
        for batch in src.iter_batches(batch_size=65_536):
            import pyarrow as pa

            writer.write(pa.Table.from_batches([batch]))
        writer.close()
    t2 = time.perf_counter()
    return {"seconds": t2 - t0, "read": t1 - t0, "write": t2 - t1, "records": rows}


def check_identical(data: Path, tmp: Path, strategy: str) -> bool:
    """Streamed files (two batch sizes) == the in-memory path, byte for byte."""
    from karma.core.stage import execute
    from karma.kinship.kinship import STAGE as KINSHIP
    from karma.kinship.kinship import KinshipPaths
    from karma.pairing.layouts import SPLITS
    from karma.pairing.preferences import STAGE, PreferencesPaths
    from karma.pairing.settings import PreferencesConfig
    from karma.pairing.stream import make_pairs
    from karma.pairing.ultrafeedback import read_ultrafeedback
    from karma.pairing.writers import write_splits
    from karma.params import Params

    kin = tmp / "kin-check"
    execute(KINSHIP, Params(), KinshipPaths(scores=SCORES, out=kin))
    files = []
    for b in (997, 100_000):
        cfg = PreferencesConfig(dataset=str(data), batch_records=b)
        out = tmp / f"stream-{b}"
        execute(STAGE, Params(kinship=strategy, preferences=cfg),
                PreferencesPaths(kinship_dir=kin, out=out))  # fmt: skip
        files.append({f.name: f.read_bytes() for f in out.glob("*.parquet")})
    models, kinship = _kinship()
    res = make_pairs(read_ultrafeedback(data), models.select("model", "s_pref"), kinship,
                     strategy=strategy, test_fraction=0.2)  # fmt: skip
    write_splits(res, tmp / "memory")
    files.append({f.name: f.read_bytes() for f in (tmp / "memory").glob("*.parquet")})
    return files[0] == files[1] == files[2] and len(files[0]) == len(SPLITS)


def _child(args: argparse.Namespace) -> None:
    if args.child == "stage":
        out = run_stage(Path(args.data), Path(args.out), args.strategy, args.repeat)
    elif args.child == "stream":
        out = run_streaming(Path(args.data), Path(args.out), args.strategy)
    elif args.child == "floor":
        out = run_floor(Path(args.data), Path(args.out))
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


#: The commit the issue measured ``karma preferences`` against (before the speed regression).
PEER = "f20f010"


def peer_checkout(rev: str, root: Path) -> Path:
    """A detached ``git worktree`` of ``rev`` under ``root`` (its own Numba caches)."""
    path = root / f"karma-{rev}"
    if not (path / "karma").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO,
                       check=True, capture_output=True)  # fmt: skip
    return path


def peer_commands(data: Path, tmp: Path, peer: Path, strategy: str) -> dict[str, tuple]:
    """``name -> (argv, cwd, env)``: ``karma preferences`` of this tree and of the peer (whose
    CLI computes the kinship from the score table itself and writes one Parquet file), and the
    per-record loop (:func:`run_loop`), each a whole process from start to exit."""
    import os

    from karma.core.stage import execute
    from karma.kinship.kinship import STAGE as KINSHIP
    from karma.kinship.kinship import KinshipPaths
    from karma.params import Params

    kin = tmp / "kinship"
    if not kin.is_dir():
        execute(KINSHIP, Params(), KinshipPaths(scores=SCORES, out=kin))
    py = sys.executable
    ours = [py, "-m", "karma.cli", "preferences", "--kinship-dir", str(kin), "--out",
            str(tmp / "ours"), "--kinship", strategy, "--dataset", str(data)]  # fmt: skip
    theirs = [py, "-m", "karma.cli", "preferences", "--scores", "data/origin/scores.csv",
              "--kinship", strategy, "--out", str(tmp / "peer.parquet"),
              "--dataset", str(data)]  # fmt: skip
    loop = [py, "-m", "benchmarks.preferences", "--child", "loop", "--data", str(data), "--out",
            str(tmp / "loop.parquet"), "--strategy", strategy]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {
        "ours": (ours, REPO, {**env, "PYTHONPATH": str(REPO)}),
        "peer": (theirs, peer, {**env, "PYTHONPATH": str(peer)}),
        "loop": (loop, REPO, {**env, "PYTHONPATH": str(REPO)}),
    }


def timed(cmd: tuple) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of one whole process."""
    argv, cwd, env = cmd
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[2:4]} failed:\n{proc.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu


def _spread(values: list[float]) -> str:
    v = sorted(values)
    return f"{v[0]:7.2f} {v[len(v) // 2]:7.2f} {v[-1]:7.2f}"


def peer_main(args: argparse.Namespace) -> None:
    """``karma preferences`` of this tree vs the peer commit's and vs the per-record loop:
    whole processes, run in turn (ours, peer, ours, peer, ...) so that a drift of the
    machine's speed reaches both; ratios are taken run by run."""
    n = int(args.sizes.split(",")[0]) if args.sizes != "64000,1000000" else 500_000
    with tempfile.TemporaryDirectory(prefix="karma-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        data = (Path(args.inputs) if args.inputs else tmp) / f"uf_{n}.parquet"
        if not data.exists():
            make_data(n, data)
        peer = peer_checkout(args.peer, Path(args.peer_root or tmp))
        cmds = peer_commands(data, tmp, peer, args.strategy)
        print(f"== {n:,} instructions x 4 completions, --kinship {args.strategy}; this tree "
              f"vs {args.peer} ({peer}), {args.runs} runs each in turn", flush=True)  # fmt: skip
        for name in ("ours", "peer"):  # warm-up: Numba caches, page cache
            timed(cmds[name])
        runs: dict[str, list[tuple[float, float]]] = {"ours": [], "peer": []}
        for _ in range(args.runs):
            for name in runs:
                runs[name].append(timed(cmds[name]))
        loops = [timed(cmds["loop"]) for _ in range(args.loop_runs)]
        print(f"{'':22s} {'min':>7s} {'median':>7s} {'max':>7s}")
        for name, rs in (*runs.items(), ("loop", loops)):
            print(f"{name + ' wall s':22s} {_spread([w for w, _ in rs])}")
            print(f"{name + ' cpu s':22s} {_spread([c for _, c in rs])}")
        pairs = list(zip(runs["ours"], runs["peer"], strict=True))
        print(f"{'ours/peer wall':22s} {_spread([a[0] / b[0] for a, b in pairs])}  (goal <= 1)")
        print(f"{'ours/peer cpu':22s} {_spread([a[1] / b[1] for a, b in pairs])}")
        loop_wall = sorted(w for w, _ in loops)[len(loops) // 2]
        speedup = [loop_wall / w for w, _ in runs["ours"]]
        print(f"{'loop/ours wall':22s} {_spread(speedup)}  (goal >= 5)")
        ours = sum(pl.scan_parquet(f).select(pl.len()).collect().item()
                   for f in (tmp / "ours").glob("*.parquet"))  # fmt: skip
        theirs = pl.scan_parquet(tmp / "peer.parquet").select(pl.len()).collect().item()
        print(f"pairs: ours {ours:,}, {args.peer} {theirs:,}")
        if not args.peer_root:
            subprocess.run(["git", "worktree", "remove", "--force", str(peer)], cwd=REPO,
                           check=False, capture_output=True)  # fmt: skip


def _same_pairs(a: Path, b: Path) -> bool:
    """Whether two pairs files hold the same pairs (texts, models, kinship, ratings), in order."""
    cols = ["prompt", "chosen", "rejected", "chosen_model", "rejected_model", "kinship",
            "chosen_rating", "rejected_rating"]  # fmt: skip
    return pl.read_parquet(a).select(cols).equals(pl.read_parquet(b).select(cols))


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
    ap.add_argument("--vs", choices=["loop", "floor", "peer"], default="loop")
    ap.add_argument("--peer", default=PEER, help="--vs peer: the commit to compare with")
    ap.add_argument("--peer-root", help="--vs peer: keep its checkout here (and reuse it)")
    ap.add_argument("--runs", type=int, default=5, help="--vs peer/floor: runs of each command")
    ap.add_argument("--loop-runs", type=int, default=1, help="--vs peer: runs of the loop")
    ap.add_argument("--inputs", help="--vs floor: keep the generated inputs here (and reuse them)")
    ap.add_argument("--child", choices=["stage", "loop", "stream", "floor"])
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--repeat", type=int, default=3, help="stage runs per size (median)")
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    if args.vs == "floor":
        floor_main(args)
        return
    if args.vs == "peer":
        peer_main(args)
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
                same = _same_pairs(tmp / "stage.parquet", tmp / "loop.parquet")
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


def floor_main(args: argparse.Namespace) -> None:
    """The streaming stage vs the read + write floor, per size."""
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes != "64000,1000000" else [
        100_000, 1_000_000, 10_000_000]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="karma-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for k, n in enumerate(sizes):
            data = (Path(args.inputs) if args.inputs else tmp) / f"uf_{n}.parquet"
            t = time.perf_counter()
            if not data.exists():
                make_data(n, data)
            print(f"\n== {n:,} instructions x 4 completions ({data.stat().st_size / 2**20:,.0f} "
                  f"MiB Parquet, made in {time.perf_counter() - t:.0f} s), "
                  f"strategy {args.strategy}", flush=True)  # fmt: skip
            if k == 0:
                same = check_identical(data, tmp, args.strategy)
                print(f"streamed (batches of 997 and 100k) == in-memory, byte for byte: {same}")
            out = tmp / "prefs"
            runs = []  # (stage, floor), in turn, so that a drift of the machine reaches both
            for _ in range(args.runs):
                runs.append((_spawn("stream", data, out, args.strategy),
                             _spawn("floor", data, out, args.strategy)))  # fmt: skip
            st, fl = runs[0]
            print(f"stage: {st['pairs']:,} pairs ({st['out_bytes'] / 2**20:,.0f} MiB out), "
                  f"peak RSS {max(r[0]['max_rss_gib'] for r in runs):.2f} GiB; floor: read "
                  f"{fl['read']:.1f} s + write {fl['write']:.1f} s, peak RSS "
                  f"{max(r[1]['max_rss_gib'] for r in runs):.2f} GiB")  # fmt: skip
            print(f"{'':14s} {'min':>7s} {'median':>7s} {'max':>7s}  ({args.runs} runs each)")
            print(f"{'stage s':14s} {_spread([a['seconds'] for a, _ in runs])}")
            print(f"{'floor s':14s} {_spread([b['seconds'] for _, b in runs])}")
            ok = "met" if max(r[0]["max_rss_gib"] for r in runs) < 2 else "MISSED"
            goal = "1.5" if n >= 1_000_000 else "2"  # issue 17: <= 2x at 100k, <= 1.5x at 1M
            ratios = [a["seconds"] / b["seconds"] for a, b in runs]
            print(f"{'stage / floor':14s} {_spread(ratios)}  (goal <= {goal}x); "
                  f"peak memory goal < 2 GiB: {ok}", flush=True)  # fmt: skip
            for f in [*tmp.glob("floor_*"), *([] if args.inputs else [data])]:
                f.unlink()


if __name__ == "__main__":
    main()
