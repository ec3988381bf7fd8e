"""Hostile input: every ``karma`` command answers bad input in one line, in seconds, losing nothing.

* ``CASES``: bad inputs across every command and every stage's params, run through the real CLI
  (in-process ``karma.cli.main``; those marked ``sub`` also as ``python -m karma.cli``) in one
  shared workspace that holds earlier outputs and foreign files. Each must exit non-zero with ONE
  line on stderr naming the file or flag (and the field), no traceback, leave the workspace
  byte-identical (nothing new, nothing changed) and take under 10 s.
  ``python -m tests.test_hostile`` prints every input with what it now says.
* Kill tests: SIGKILL at every step of a commit, and at several times of a run over a large
  input, leaves the earlier output set (or the new one) whole; the next run finishes or drops
  what the killed one left, so no temporary file remains and the set is consistent.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo/ultrafeedback_demo.jsonl"
RO = "/sys/karma-hostile" if os.geteuid() == 0 else "ro/sub"  # root ignores chmod


# --------------------------------------------------------------------------- the workspace


def _cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``karma <argv>`` in-process in ``cwd``: (exit code, stdout, stderr)."""
    from karma.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with (
            contextlib.chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        root.handlers[:], root.level = saved
    return code, out.getvalue(), err.getvalue()


def _env(cache: Path) -> dict[str, str]:
    """The environment of a subprocess: this checkout first, its own cache."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "KARMA_CACHE_DIR": str(cache), "PYTHONPATH": path}


def _ok(argv: list[str], cwd: Path) -> None:
    code, _, err = _cli(argv, cwd)
    assert code == 0, err[-2000:]


def build_workspace(ws: Path) -> None:
    """Inputs, earlier outputs of karma, foreign files and the hostile files of ``CASES``."""
    import polars as pl

    from karma.evaluation.taskconfig import ensure_punkt
    from tests.fixtures import synthetic_pairs

    ws.mkdir(parents=True, exist_ok=True)
    ensure_punkt()  # the cache lm-eval's IFEval needs: a first run writes it (and says so)
    # paid once per session (torch + transformers: 4 s idle, 14 s on a loaded 2-core machine):
    # the train cases time their checks only
    from trl import DPOConfig  # noqa: F401

    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    demo = DEMO.read_text().splitlines()
    (ws / "demo.jsonl").write_text("\n".join(demo[:40]) + "\n")
    for d in ("measured", "model", "mine", "bad/adir.csv", "bad/cdir.jsonl", "bad/jdir.json",
              "bad/emptyds"):  # fmt: skip
        (ws / d).mkdir(parents=True, exist_ok=True)
    (ws / "mine/notes.txt").write_text("the user's own notes\n")
    (ws / "fakemodel").mkdir(exist_ok=True)  # looks like a model dir: the task file fails first
    (ws / "fakemodel/config.json").write_text("{}\n")
    (ws / "notes.txt").write_text("a file of the user\n")
    # earlier outputs (karma's): a kinship dir + metrics, preference pairs + metrics
    _ok(["kinship", "--scores", "scores.csv", "--out", "kin", "--metrics", "km.json"], ws)
    _ok(["preferences", "--kinship-dir", "kin", "--out", "prefs", "--metrics", "pm.json",
         "--dataset", "demo.jsonl"], ws)  # fmt: skip
    shutil.copytree(ws / "kin", ws / "kin_extra")
    (ws / "kin_extra/notes.md").write_text("added by the user into karma's output\n")
    if not RO.startswith("/"):
        (ws / "ro").mkdir()
        (ws / "ro").chmod(0o555)

    # outputs of other stages that dvc.lock records, and files of the user's beside outputs
    (ws / "metrics").mkdir(exist_ok=True)
    for name in ("kinship", "preferences"):
        (ws / f"metrics/{name}.json").write_text('{"n": 1}\n')
    (ws / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  kinship:\n    cmd: x\n    outs:\n"
        "    - path: metrics/kinship.json\n  preferences:\n    cmd: x\n    outs:\n"
        "    - path: metrics/preferences.json\n"
    )
    (ws / "user.json").write_text('{"mine": true}\n')
    (ws / "user.png").write_bytes(b"\x89PNG the user's picture")
    os.symlink("user.json", ws / "link.json")
    (ws / "myreport").mkdir(exist_ok=True)
    (ws / "myreport/report.md").write_text("# my own report\n")
    (ws / ".s.karma-tmp.csv").write_text((ws / "scores.csv").read_text())
    (ws / ".d.karma-tmp.jsonl").write_text("\n".join(demo[:4]) + "\n")
    bad = ws / "bad"
    os.mkfifo(ws / "fifo.csv")
    texts: dict[str, str | bytes] = {
        "unterminated.csv": 'model,ifeval\n"gpt-4,85\nclaude,80\n',
        "dupcol.csv": "model,ifeval,mmlu_pro,ifeval\na,1,2,3\nb,3,4,5\n",
        "blankcol.csv": "model,ifeval,\na,1,2\nb,3,4\n",
        "mixed.csv": "model,benchmark,score,ifeval\na,mmlu_pro,1,2\nb,mmlu_pro,3,4\n",
        "ragged.csv": "model,ifeval\na,1,2\nb,3\n",
        "nonutf8.csv": b"model,ifeval\na,1\n\xff\xfe,2\n",
        "empty.csv": "",
        "dupmodel.tsv": "model\tifeval\na\t1\nA\t2\n",
        "unterminated.tsv": 'model\tifeval\na\t1\n"b\t2\n',
        "inf.csv": "model,ifeval\na,1\nb,inf\n",
        "modelnum.json": '[{"model": 1, "ifeval": 2}, {"model": "b", "ifeval": 3}]',
        "trunc.json": '[{"model": "a", "ifeval": 2}, {"mod',
        "trunc.jsonl": '{"model": "a", "ifeval": 1}\n{"model": "b", "ife',
        "wide.csv": "model," + ",".join(f"b{i}" for i in range(2000)) + "\na\nb\n",
        "longrow.csv": "model,ifeval\n" + "m" * 100 + ",1\nb,2\n",
        "trunc_c.jsonl": "\n".join(demo[:5]) + "\n" + demo[5][: len(demo[5]) // 2] + "\n",
        "longline.jsonl": json.dumps({"instruction": "x" * 3000, "completions": []}) + "\n",
        "comp.json": "[" + ",".join(demo[:3]) + "]",
        "trunc_c.json": "[" + ",".join(demo[:3])[:-40],
        "trunc.yaml": "select: {ratio: 0.5\nseed: 1\n",
        "unknown.yaml": "selekt: {ratio: 0.5}\n",
        "list.yaml": "- 1\n- 2\n",
        "big.yaml": "seed: 1\n" + "# padding\n" * 20,
        "task_trunc.yaml": "task: mine\ndataset_kwargs: [\n",
        "measured/x.json": "{",
        "bomb.yaml": BOMB + "scores: {aliases: {m: *i}}\n",  # 10^9 values in 300 bytes
        "dupkey.yaml": "seed: 1\nkinship: score\nseed: 2\n",
        "seedtrue.yaml": "seed: true\n",
        "deepyaml.yaml": "scores: {aliases: " + "[" * 60 + "]" * 60 + "}\n",
        "dupkey.json": '[{"model": "a", "ifeval": 1, "ifeval": 2}, {"model": "b", "ifeval": 3}]',
        "deep.json": "[" * 100_000 + "]" * 100_000,
        "bigint.json": '[{"model": "a", "ifeval": 1' + "0" * 5000 + "}]",
        "code.yaml": "task: mine\ndataset_path: json\nprocess_docs: !function utils.process\n",
    }
    rec = json.loads(demo[0])
    rec["completions"][1]["model"] = " " + rec["completions"][0]["model"].upper()
    texts["repeat.jsonl"] = json.dumps(rec) + "\n"
    rec = json.loads(demo[1])
    rec["completions"][0]["response"] = "broken \ud800 text"
    texts["surrogate.jsonl"] = demo[0] + "\n" + json.dumps(rec) + "\n"  # \ud800 escaped
    for name, text in texts.items():
        p = bad / name
        p.parent.mkdir(parents=True, exist_ok=True)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)  # type: ignore[operator]
    with (bad / "huge.csv").open("w") as fh:  # one 50 MB line: millions of columns
        fh.write("model" + ",benchmark_with_a_long_name" * 1_900_000 + "\n")
    os.symlink("nowhere.csv", bad / "dangling.csv")
    os.symlink("nowhere.json", bad / "dangling.json")
    os.symlink("nowhere.jsonl", bad / "dangling.jsonl")
    (bad / "pdir").mkdir()
    good = (ws / "prefs/train_prefs.parquet").read_bytes()
    (bad / "trunc_pairs.parquet").write_bytes(good[: len(good) // 2])
    synthetic_pairs(4).drop("chosen").write_parquet(bad / "nochosen.parquet")
    (bad / "trunc.parquet").write_bytes(b"PAR1" + good[4:200])
    shutil.copytree(ws / "kin", bad / "kin_corrupt")
    (bad / "kin_corrupt/models.parquet").write_bytes(b"PAR1 not really")
    pl.DataFrame(
        {"instruction": ["q"], "completions": [[{"model": 7, "response": "a"}]]}
    ).write_parquet(bad / "modelint.parquet")


@dataclass(frozen=True)
class Case:
    """A bad input: the command line, a substring of the one line it must print, exit code."""

    id: str
    argv: tuple[str, ...]
    says: str
    code: int = 1
    sub: bool = False  # also run as a subprocess (python -m karma.cli)


#: A YAML alias bomb: each line holds ten of the previous (10^9 values in 400 bytes; printing
#: the issue's 308-byte one ran past 60 s and 1.8 GB).
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 10)}]\n"
    for p, n in zip("abcdefgh", "bcdefghi", strict=True)
)
SC = ("scores", "--measured-dir", "measured", "--out", "new/s.csv")
KI = ("kinship", "--out", "new/k", "--scores")
PR = ("preferences", "--kinship-dir", "kin", "--out", "new/p", "--dataset")
FE = ("fetch", "--out", "new/c.parquet", "--dataset")
SW = ("tau-sweep", "--kinship-dir", "kin", "--out", "new/t.csv")
SE = ("select", "--pairs", "prefs/train_prefs.parquet", "--model", "model", "--out", "new/sel")
TR = ("train", "--data", "prefs/train_prefs.parquet", "--base", "model", "--out", "new/pol",
      "--checkpoints", "new/ck")  # fmt: skip
EV = ("evaluate", "--model", "model", "--out", "new/e")
OUT_IS_INPUT = "output path is (or holds, or lies inside) the input"
NOT_KARMA = "output directory exists and was not written by karma"

CASES = [
    # ---- scores: the reported table in every format, the measured rows, the paths
    Case("scores-csv-unterminated-quote", (*SC, "--reported", "bad/unterminated.csv"),
         'bad/unterminated.csv: line 2: malformed CSV: unterminated quoted field', sub=True),
    Case("scores-csv-repeated-benchmark", (*SC, "--reported", "bad/dupcol.csv"),
         "bad/dupcol.csv: duplicate benchmark column 'ifeval' (columns 2 and 4", sub=True),
    Case("scores-csv-blank-column", (*SC, "--reported", "bad/blankcol.csv"),
         "bad/blankcol.csv: column 3: blank column name"),
    Case("scores-csv-mixed-layout", (*SC, "--reported", "bad/mixed.csv"),
         "bad/mixed.csv: mixed wide and long layout"),
    Case("scores-csv-ragged-row", (*SC, "--reported", "bad/ragged.csv"),
         "bad/ragged.csv: line 2: 3 fields, more than the header's 2"),
    Case("scores-csv-not-utf8", (*SC, "--reported", "bad/nonutf8.csv"),
         "bad/nonutf8.csv: line 3: not UTF-8 text (byte 0xff"),
    Case("scores-csv-empty", (*SC, "--reported", "bad/empty.csv"), "bad/empty.csv: empty file"),
    Case("scores-csv-infinite-score", (*SC, "--reported", "bad/inf.csv"),
         "bad/inf.csv: field 'ifeval': line 3 (model 'b'): non-numeric score"),
    Case("scores-tsv-duplicate-model", (*SC, "--reported", "bad/dupmodel.tsv"),
         "bad/dupmodel.tsv: field 'model': line 3: duplicate model 'a'"),
    Case("scores-tsv-unterminated-quote", (*SC, "--reported", "bad/unterminated.tsv"),
         "bad/unterminated.tsv: line 3: malformed TSV: unterminated quoted field"),
    Case("scores-json-model-not-text", (*SC, "--reported", "bad/modelnum.json"),
         "bad/modelnum.json: field 'model': record 1: model id is not text (got 1"),
    Case("scores-json-truncated", (*SC, "--reported", "bad/trunc.json"),
         "bad/trunc.json: line 1, column 32: not valid JSON"),
    Case("scores-jsonl-truncated", (*SC, "--reported", "bad/trunc.jsonl"),
         "bad/trunc.jsonl: line 2, column 16: not valid JSON"),
    Case("scores-parquet-truncated", (*SC, "--reported", "bad/trunc.parquet"),
         "bad/trunc.parquet: not a readable Parquet file"),
    Case("scores-reported-is-directory", (*SC, "--reported", "bad/adir.csv"),
         "bad/adir.csv: score table is a directory"),
    Case("scores-reported-dangling-symlink", (*SC, "--reported", "bad/dangling.csv"),
         "bad/dangling.csv: score table is a dangling symlink"),
    Case("scores-out-is-the-reported-input",
         ("scores", "--measured-dir", "measured", "--out", "scores.csv", "--reported",
          "scores.csv"), f"scores.csv: field '--out': {OUT_IS_INPUT} --reported"),
    Case("scores-measured-row-bad-json",
         ("scores", "--measured-dir", "bad/measured", "--out", "new/s.csv", "--reported",
          "scores.csv", "-S", "scores.measured={x: some/model}"),
         "bad/measured/x.json: not valid JSON"),
    Case("scores-measured-bad-name", (*SC, "-S", "scores.measured={'a b': some/model}"),
         "-S scores.measured: field 'a b'"),
    Case("scores-measured-dir-is-a-file",
         ("scores", "--measured-dir", "notes.txt", "--out", "new/s.csv"),
         "notes.txt: field '--measured-dir': input is not a directory"),
    Case("scores-out-wrong-suffix", ("scores", "--measured-dir", "measured", "--out", "s.xlsx"),
         "s.xlsx: field '--out': wrong output suffix"),
    Case("scores-scale-range", (*SC, "-S", "scores.scale.ifeval=-1"),
         "-S scores.scale.ifeval: out of range"),
    # ---- kinship: sizes, paths, outputs, params and params files
    Case("kinship-50MB-single-line", (*KI, "bad/huge.csv"),
         "bad/huge.csv: line 1 is longer than limits.max_line_bytes = 16777216 (raise it with "
         "-S limits.max_line_bytes=N", sub=True),
    Case("kinship-too-many-columns", (*KI, "bad/wide.csv"),
         "bad/wide.csv: line 1: 2001 columns, more than limits.max_columns = 1000"),
    Case("kinship-line-limit-param", (*KI, "bad/longrow.csv", "-S", "limits.max_line_bytes=64"),
         "bad/longrow.csv: line 2 is longer than limits.max_line_bytes = 64"),
    Case("kinship-scores-dangling-symlink", (*KI, "bad/dangling.csv"),
         "bad/dangling.csv: field '--scores': input is a dangling symlink"),
    Case("kinship-scores-is-directory", (*KI, "bad/adir.csv"),
         "bad/adir.csv: field '--scores': input is not a file"),
    Case("kinship-out-dot", ("kinship", "--scores", "scores.csv", "--out", "."),
         f".: field '--out': {OUT_IS_INPUT} --scores", sub=True),
    Case("kinship-out-holds-input", ("kinship", "--scores", "bad/dupcol.csv", "--out", "bad"),
         f"bad: field '--out': {OUT_IS_INPUT} --scores"),
    Case("kinship-out-foreign-directory",
         ("kinship", "--scores", "scores.csv", "--out", "mine"),
         f"mine: field '--out': {NOT_KARMA} (no .written-by-karma; holds notes.txt)", sub=True),
    Case("kinship-out-karma-dir-with-a-user-file",
         ("kinship", "--scores", "scores.csv", "--out", "kin_extra"),
         "kin_extra: field '--out': output directory holds 1 file(s) that karma did not write "
         "(notes.md)"),
    Case("kinship-out-is-a-file", ("kinship", "--scores", "scores.csv", "--out", "notes.txt"),
         "notes.txt: field '--out': output is a file"),
    Case("kinship-out-dangling-symlink",
         ("kinship", "--scores", "scores.csv", "--out", "bad/dangling.json"),
         "bad/dangling.json: field '--out': output is a dangling symlink"),
    Case("kinship-metrics-inside-out",
         ("kinship", "--scores", "scores.csv", "--out", "kin", "--metrics", "kin/m.json"),
         "kin/m.json: field '--metrics': output path is (or holds, or lies inside) the output "
         "--out"),
    Case("kinship-read-only-destination",
         ("kinship", "--scores", "scores.csv", "--out", f"{RO}/k"),
         f"{RO}/k: field '--out': cannot write the output here", sub=True),
    Case("kinship-fails-after-staging-nested-out",
         ("kinship", "--scores", "scores.csv", "--out", "new/a/b/k", "--plots", "new/p",
          "--metrics", "new/m/k.json", "-S", "similarity.min_common=50"),
         "-S similarity.min_common: no pair of models shares enough benchmarks"),
    Case("kinship-tau-range", (*KI, "scores.csv", "--tau", "2"),
         "--tau: out of range (got 2; expected -1 <= tau <= 1)"),
    Case("kinship-metric-choice", (*KI, "scores.csv", "--metric", "cosin"),
         "--metric: not one of the choices; did you mean 'cosine'?"),
    Case("kinship-groups-empty", (*KI, "scores.csv", "-S", "similarity.groups.knowledge=[]"),
         "-S similarity.groups.knowledge"),
    Case("kinship-limit-range", (*KI, "scores.csv", "-S", "limits.max_columns=1"),
         "-S limits.max_columns: out of range (got 1; expected 2 <= max_columns)"),
    Case("kinship-limit-type", (*KI, "scores.csv", "-S", "limits.max_line_bytes=lots"),
         "-S limits.max_line_bytes: wrong type"),
    Case("kinship-unknown-option", (*KI, "scores.csv", "--taux", "0.2"),
         "No such option '--taux'. Did you mean '--tau'?", code=2),
    Case("kinship-params-is-directory", (*KI, "scores.csv", "--params", "bad/pdir"),
         "bad/pdir: is a directory"),
    Case("kinship-params-truncated-yaml", (*KI, "scores.csv", "--params", "bad/trunc.yaml"),
         "bad/trunc.yaml: line 2: not valid YAML", sub=True),
    Case("kinship-params-unknown-section", (*KI, "scores.csv", "--params", "bad/unknown.yaml"),
         "bad/unknown.yaml: field 'selekt': unknown key; did you mean 'select'"),
    Case("kinship-params-not-a-mapping", (*KI, "scores.csv", "--params", "bad/list.yaml"),
         "bad/list.yaml: top level must be a mapping"),
    Case("kinship-params-too-big",
         (*KI, "scores.csv", "--params", "bad/big.yaml", "-S", "limits.max_yaml_bytes=64"),
         "bad/big.yaml: YAML file of 208 bytes, more than limits.max_yaml_bytes = 64"),
    Case("kinship-params-missing", (*KI, "scores.csv", "--params", "bad/none.yaml"),
         "bad/none.yaml: params file not found"),
    # ---- preferences: completions in every format, limits, structure, paths, params
    Case("prefs-jsonl-truncated", (*PR, "bad/trunc_c.jsonl"),
         "bad/trunc_c.jsonl: malformed JSON on line 6"),
    Case("prefs-json-truncated", (*PR, "bad/trunc_c.json"),
         "bad/trunc_c.json: malformed JSON on line 1"),
    Case("prefs-model-repeats-in-one-instruction", (*PR, "bad/repeat.jsonl"),
         "bad/repeat.jsonl: record 0: field 'completions[1].model': model"),
    Case("prefs-line-limit", (*PR, "bad/longline.jsonl", "-S", "limits.max_line_bytes=1000"),
         "bad/longline.jsonl: line 1 is longer than limits.max_line_bytes = 1000"),
    Case("prefs-record-limit", (*PR, "demo.jsonl", "-S", "limits.max_record_bytes=100"),
         "demo.jsonl: line 1: record of"),
    Case("prefs-json-file-limit", (*PR, "bad/comp.json", "-S", "limits.max_file_bytes=100"),
         "bad/comp.json: file is"),
    Case("prefs-parquet-model-not-text", (*PR, "bad/modelint.parquet"),
         "bad/modelint.parquet: field 'completions[].model': wrong type"),
    Case("prefs-parquet-truncated", (*PR, "bad/trunc.parquet"),
         "bad/trunc.parquet: cannot read Parquet"),
    Case("prefs-dataset-is-directory", (*PR, "bad/cdir.jsonl"), "bad/cdir.jsonl: not a file"),
    Case("prefs-dataset-dangling-symlink", (*PR, "bad/dangling.jsonl"),
         "bad/dangling.jsonl: dataset is a dangling symlink"),
    Case("prefs-out-is-the-dataset",
         ("preferences", "--kinship-dir", "kin", "--out", "demo.jsonl", "--dataset",
          "demo.jsonl"), f"demo.jsonl: field '--out': {OUT_IS_INPUT} --dataset", sub=True),
    Case("prefs-out-is-the-kinship-dir",
         ("preferences", "--kinship-dir", "kin", "--out", "kin", "--dataset", "demo.jsonl"),
         f"kin: field '--out': {OUT_IS_INPUT} --kinship-dir"),
    Case("prefs-kinship-dir-corrupt",
         ("preferences", "--kinship-dir", "bad/kin_corrupt", "--out", "new/p", "--dataset",
          "demo.jsonl"), "bad/kin_corrupt/models.parquet: not a readable kinship output"),
    Case("prefs-strategy-choice", (*PR, "demo.jsonl", "--kinship", "karma"),
         "--kinship: not one of the choices"),
    Case("prefs-rating-choice", (*PR, "demo.jsonl", "--rating", "overall"),
         "--rating: not one of the choices; did you mean 'overall_score'?"),
    Case("prefs-seed-range", (*PR, "demo.jsonl", "--seed", "-1"), "--seed: out of range"),
    Case("prefs-plot-suffix", (*PR, "demo.jsonl", "--plot", "new/p.jpg"),
         "new/p.jpg: field '--plot': wrong output suffix"),
    # ---- fetch: the source (file, directory, hub id), the output
    Case("fetch-jsonl-truncated", (*FE, "bad/trunc_c.jsonl"),
         "bad/trunc_c.jsonl: malformed JSON on line 6"),
    Case("fetch-parquet-truncated", (*FE, "bad/trunc.parquet"), "bad/trunc.parquet: cannot read"),
    Case("fetch-dataset-missing", (*FE, "bad/none.jsonl"), "bad/none.jsonl: field "
         "'fetch.dataset': dataset not found"),
    Case("fetch-hub-id-without-revision", (*FE, "openbmb/UltraFeedback"),
         "field 'fetch.revision': a hub dataset needs a pinned revision"),
    Case("fetch-local-directory-without-data", (*FE, "bad/emptyds"),
         "bad/emptyds: field 'fetch.dataset': local dataset directory holds no data files"),
    Case("fetch-out-suffix", ("fetch", "--out", "new/c.jsonl", "--dataset", "demo.jsonl"),
         "new/c.jsonl: field '--out': wrong output suffix"),
    Case("fetch-out-is-the-dataset", ("fetch", "--out", "demo.jsonl", "--dataset",
                                      "demo.jsonl"), OUT_IS_INPUT),
    # ---- tau-sweep: the completions, the grid, the output
    Case("sweep-jsonl-truncated", (*SW, "--dataset", "bad/trunc_c.jsonl"),
         "bad/trunc_c.jsonl: malformed JSON on line 6"),
    Case("sweep-tau-range", (*SW, "--dataset", "demo.jsonl", "-S", "sweep.taus=[0.1, 2]"),
         "-S sweep.taus: out of range"),
    Case("sweep-draws-range", (*SW, "--dataset", "demo.jsonl", "--draws", "1"),
         "--draws: out of range"),
    Case("sweep-out-suffix", ("tau-sweep", "--kinship-dir", "kin", "--out", "new/t.txt",
                              "--dataset", "demo.jsonl"), "new/t.txt: field '--out': wrong"),
    # ---- base-model
    Case("base-out-foreign-directory", ("base-model", "--out", "mine"),
         f"mine: field '--out': {NOT_KARMA}"),
    Case("base-unknown-embedded", ("base-model", "--out", "new/b", "--source", "embedded:smol"),
         "--source: unknown embedded model"),
    Case("base-source-missing-dir", ("base-model", "--out", "new/b", "--source", "./nope/m"),
         "--source: neither an existing directory nor a hub id"),
    Case("base-dtype-choice", ("base-model", "--out", "new/b", "--dtype", "float8"),
         "--dtype: not one of the choices"),
    Case("base-check-tokens-range", ("base-model", "--out", "new/b", "--check-max-new-tokens",
                                     "0"), "--check-max-new-tokens: out of range"),
    # ---- select
    Case("select-pairs-truncated", ("select", "--pairs", "bad/trunc_pairs.parquet", "--model",
                                    "model", "--out", "new/sel"),
         "bad/trunc_pairs.parquet: not a readable parquet file"),
    Case("select-pairs-missing-column", ("select", "--pairs", "bad/nochosen.parquet", "--model",
                                         "model", "--out", "new/sel"),
         "bad/nochosen.parquet: field 'chosen': column missing"),
    Case("select-pairs-are-jsonl", ("select", "--pairs", "demo.jsonl", "--model", "model",
                                    "--out", "new/sel"), "demo.jsonl: not a readable parquet"),
    Case("select-record-limit", (*SE, "-S", "limits.max_record_bytes=64"),
         "prefs/train_prefs.parquet: pair 0 holds", sub=True),
    Case("select-ratio-range", (*SE, "--ratio", "0"), "--ratio: out of range"),
    Case("select-method-choice", (*SE, "--method", "mapp"), "did you mean 'map'?"),
    Case("select-weight-infinite", (*SE, "--weight", ".inf"), "--weight: a finite number"),
    Case("select-dpo-form-without-reference", (*SE, "--method", "map", "--implicit-form", "dpo"),
         "--implicit-form: the DPO-form implicit margin needs a reference model"),
    Case("select-model-is-a-file", ("select", "--pairs", "prefs/train_prefs.parquet", "--model",
                                    "notes.txt", "--out", "new/sel"),
         "notes.txt: field '--model': input is not a directory"),
    Case("select-out-inside-model", ("select", "--pairs", "prefs/train_prefs.parquet", "--model",
                                     "model", "--out", "model/sel"),
         f"model/sel: field '--out': {OUT_IS_INPUT} --model"),
    # ---- train
    Case("train-reserved-trl-key", (*TR, "-S", "train.trl.seed=1"),
         "-S train.trl.seed: 'seed' is set by the top-level 'seed'"),
    Case("train-method-choice", (*TR, "--method", "ppo"), "--method: not one of the choices"),
    Case("train-processes-range", (*TR, "--num-processes", "0"), "--num-processes: out of range"),
    Case("train-recipe-missing", (*TR, "--recipe", "bad/none.yaml"),
         "--recipe: recipe file not found"),
    Case("train-checkpoints-are-the-out",
         ("train", "--data", "prefs/train_prefs.parquet", "--base", "model", "--out", "new/pol",
          "--checkpoints", "new/pol"), "new/pol: field '--checkpoints': output path is"),
    Case("train-out-is-the-base",
         ("train", "--data", "prefs/train_prefs.parquet", "--base", "model", "--out", "model",
          "--checkpoints", "new/ck"), f"model: field '--out': {OUT_IS_INPUT} --base"),
    Case("train-stored-reference-without-its-dir", (*TR, "--reference", "stored"),
         "field '--reference-logps': train.reference stored reads the reference stage's output"),
    Case("train-fixed-loss-type", (*TR, "-S", "train.dpo.loss_type=hinge"),
         "-S train.dpo.loss_type: 'loss_type' is set by train.method"),
    # ---- reference
    Case("reference-out-is-the-base",
         ("reference", "--data", "prefs/train_prefs.parquet", "--base", "model", "--out", "model"),
         f"model: field '--out': {OUT_IS_INPUT} --base"),
    # ---- evaluate and benchmark
    Case("evaluate-limit-range", (*EV, "--limit", "0"), "--limit: out of range"),
    Case("evaluate-suite-choice", (*EV, "--suite", "embeded"), "did you mean 'embedded'"),
    Case("evaluate-metrics-suffix", (*EV, "--metrics", "new/e.txt"),
         "new/e.txt: field '--metrics': wrong output suffix"),
    Case("evaluate-baseline-dangling", (*EV, "--baseline", "bad/dangling.json"),
         "bad/dangling.json: field '--baseline': input is a dangling symlink"),
    Case("evaluate-not-a-model-dir", EV, "model: field 'model': not a model directory"),
    Case("evaluate-task-file-truncated",
         ("evaluate", "--model", "fakemodel", "--out", "new/e",
          "-S", "evaluate.tasks={mine: {task: bad/task_trunc.yaml, metric: acc}}"),
         "bad/task_trunc.yaml: cannot load task"),
    Case("evaluate-unknown-lm-eval-task",
         ("evaluate", "--model", "fakemodel", "--out", "new/e",
          "-S", "evaluate.tasks={arc_easy: {task: arc_eazy, metric: acc_norm}}"),
         "field 'arc_easy.task': unknown lm-eval task; did you mean 'arc_easy'", sub=True),
    Case("benchmark-model-missing", ("benchmark", "--model", "./nope", "--out", "new/r.json"),
         "nope: field 'model': model directory not found"),
    Case("benchmark-out-is-a-directory", ("benchmark", "--model", "model", "--out",
                                          "bad/jdir.json"),
         "bad/jdir.json: field '--out': output is a directory"),
    Case("benchmark-batch-size-range", ("benchmark", "--model", "model", "--batch-size", "0"),
         "--batch-size: out of range"),
    # ---- the other commands
    Case("report-repo-missing", ("report", "--repo", "nope", "--out", "new/r"),
         "nope: cannot read DVC experiments"),
    Case("params-extra-argument", ("params", "extra"), "unexpected extra argument", code=2),
    # ---- issue 21: what this stage did not write, temporaries, bounded parsing, names
    Case("kinship-out-holds-other-stages-metrics",
         ("kinship", "--scores", "scores.csv", "--out", "metrics"),
         "metrics: field '--out': output directory holds the outputs of DVC stage "
         "'preferences' (dvc.lock), not of 'kinship'", sub=True),
    Case("kinship-metrics-foreign-file", (*KI, "scores.csv", "--metrics", "user.json"),
         "user.json: field '--metrics': output file exists and was not written by karma"),
    Case("kinship-metrics-symlink-to-foreign-file", (*KI, "scores.csv", "--metrics",
                                                     "link.json"),
         "user.json: field '--metrics': output file exists and was not written by karma"),
    Case("prefs-plot-foreign-file", (*PR, "demo.jsonl", "--plot", "user.png"),
         "user.png: field '--plot': output file exists and was not written by karma"),
    Case("kinship-metrics-other-stage-in-dvc-lock",
         (*KI, "scores.csv", "--metrics", "metrics/preferences.json"),
         "metrics/preferences.json: field '--metrics': output file exists and was not written "
         "by karma (no record of it, and dvc.lock does not assign it to stage 'kinship')"),
    Case("report-out-holds-a-user-report", ("report", "--repo", "nope", "--out", "myreport"),
         "myreport/report.md: field '--out': exists and was not written by karma"),
    Case("kinship-input-named-like-a-temporary", (*KI, ".s.karma-tmp.csv"),
         ".s.karma-tmp.csv: field '--scores': input is named like a karma temporary"),
    Case("prefs-dataset-named-like-a-temporary", (*PR, ".d.karma-tmp.jsonl"),
         ".d.karma-tmp.jsonl: field 'preferences.dataset': input is named like a karma "
         "temporary"),
    Case("kinship-scores-is-a-fifo", (*KI, "fifo.csv"),
         "fifo.csv: field '--scores': input is a FIFO, not a regular file", sub=True),
    Case("kinship-params-is-a-fifo", (*KI, "scores.csv", "--params", "fifo.csv"),
         "fifo.csv: not a regular file"),
    Case("kinship-out-empty", ("kinship", "--scores", "scores.csv", "--out", ""),
         "field '--out': empty path"),
    Case("kinship-out-too-long", ("kinship", "--scores", "scores.csv", "--out", "k" * 300),
         "field '--out': a path component of 300 bytes, longer than the file system allows"),
    Case("kinship-params-alias-bomb", (*KI, "scores.csv", "--params", "bad/bomb.yaml"),
         "bad/bomb.yaml: line 5: refused: aliases expand to more than 100000 values", sub=True),
    Case("kinship-set-alias-bomb",
         (*KI, "scores.csv", "-S", "scores.aliases={" + BOMB.replace("\n", ", ") + "m: *i}"),
         "field '-S scores.aliases': refused: aliases expand to more than 100000 values"),
    Case("kinship-params-duplicate-key", (*KI, "scores.csv", "--params", "bad/dupkey.yaml"),
         "bad/dupkey.yaml: line 3: refused: duplicate key 'seed'"),
    Case("kinship-params-deep-nesting", (*KI, "scores.csv", "--params", "bad/deepyaml.yaml"),
         "bad/deepyaml.yaml: line 1: refused: nested deeper than 32 levels"),
    Case("kinship-params-seed-true", (*KI, "scores.csv", "--params", "bad/seedtrue.yaml"),
         "bad/seedtrue.yaml: field 'seed': wrong type (got 'true'; expected int)"),
    Case("prefs-seed-true", (*PR, "demo.jsonl", "-S", "seed=true"),
         "-S seed: wrong type (got 'true'; expected int)"),
    Case("kinship-set-5000-digit-integer", (*KI, "scores.csv", "-S", "seed=1" + "0" * 5000),
         "field '-S seed': refused: an integer of 5001 digits, more than 40"),
    Case("scores-json-duplicate-key", (*SC, "--reported", "bad/dupkey.json"),
         "bad/dupkey.json: not accepted JSON: duplicate key 'ifeval'"),
    Case("scores-json-nested-100k-deep", (*SC, "--reported", "bad/deep.json"),
         "bad/deep.json: JSON nested too deeply", sub=True),
    Case("scores-json-5000-digit-integer", (*SC, "--reported", "bad/bigint.json"),
         "bad/bigint.json: not accepted JSON: an integer of 5001 digits, more than 40"),
    Case("prefs-lone-surrogate", (*PR, "bad/surrogate.jsonl"),
         "bad/surrogate.jsonl: line 2: a string holds a lone surrogate (not valid Unicode)"),
    Case("scores-two-set-keys-of-equal-length",
         (*SC, "-S", "scores.scale.ifeval=1", "-S", "scores.scale.arc_easy=-1"),
         "-S scores.scale.arc_easy: out of range"),
    Case("evaluate-section-error-names-both-flags",
         (*EV, "-S", "evaluate.backend=vllm", "-S", "evaluate.num_processes=2"),
         "-S evaluate.backend or -S evaluate.num_processes: num_processes must be 1 with backend "
         "vllm"),
    Case("train-trl-max-steps-not-a-number", (*TR, "-S", "train.trl.max_steps=many"),
         "-S train.trl.max_steps: wrong type (got 'many'; expected int)", sub=True),
    Case("train-trl-negative-learning-rate", (*TR, "-S", "train.trl.learning_rate=-1"),
         "-S train.trl.learning_rate: out of range (got -1; expected learning_rate > 0)"),
    Case("evaluate-task-file-runs-code",
         ("evaluate", "--model", "fakemodel", "--out", "new/e",
          "-S", "evaluate.tasks={mine: {task: bad/code.yaml, metric: acc}}"),
         "task file runs Python code (!function); allow it with evaluate.allow_code: true"),
    Case("dvc-yaml-extra-argument", ("dvc-yaml", "extra"), "unexpected extra argument", code=2),
    Case("compare-extra-argument", ("compare", "main", "ws", "extra"), "unexpected extra argument",
         code=2),
    Case("headline-unknown-option", ("headline", "--bogus"), "No such option", code=2),
    Case("prompts-unknown-option", ("prompts", "--bogus"), "No such option", code=2),
    Case("generate-unknown-option", ("generate", "--bogus"), "No such option", code=2),
    Case("judge-unknown-option", ("judge", "--bogus"), "No such option", code=2),
    Case("reference-unknown-option", ("reference", "--bogus"), "No such option", code=2),
    *[Case(f"{c}-unknown-option", (c, "--bogus"), "No such option", code=2)
      for c in ("sp-plan", "sp-generate", "sp-judge", "sp-select", "sp-train", "sp-evaluate")],
    Case("unknown-command", ("kinsip",), "no such command 'kinsip'; did you mean 'kinship'?",
         code=2),
]  # fmt: skip


def snapshot(*roots: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under ``roots`` with its kind and content (big files: size and mtime)."""
    out: dict[str, tuple[Any, ...]] = {}
    for root in roots:
        for dirpath, dirs, files in os.walk(root):
            for name in dirs + files:
                p = Path(dirpath, name)
                if p.is_symlink():
                    out[str(p)] = ("link", os.readlink(p))
                elif not p.is_dir() and not p.is_file():  # a FIFO: never opened
                    out[str(p)] = ("special", p.stat().st_mode)
                elif p.is_dir():
                    out[str(p)] = ("dir", p.stat().st_mode)
                else:
                    st = p.stat()
                    small = st.st_size < 2**20
                    digest = hashlib.sha256(p.read_bytes()).hexdigest() if small else st.st_mtime_ns
                    out[str(p)] = ("file", st.st_size, digest)
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("hostile")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KARMA_CACHE_DIR", str(root / "cache"))
        build_workspace(root / "ws")
        yield root
    with contextlib.suppress(OSError):
        (root / "ws/ro").chmod(0o755)


def _check(case: Case, code: int, out: str, err: str, seconds: float) -> str:
    lines = err.strip().splitlines()
    assert code == case.code, (case.id, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("karma: error: "), err[-3000:]
    line = lines[0]
    assert case.says in line, line
    words = [w.strip("./") for a in case.argv for w in re.split(r"[=\s{},:]+", a)]
    assert any(w in line for w in words if len(w) > 2), line  # the file or flag given
    assert seconds < 10, (case.id, seconds)
    assert out == "", out[:500]
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_gets_one_line_and_loses_nothing(ws: Path, case: Case) -> None:
    before = snapshot(ws)
    t0 = time.perf_counter()
    code, out, err = _cli(list(case.argv), ws / "ws")
    _check(case, code, out, err, time.perf_counter() - t0)
    assert snapshot(ws) == before, "a failed command changed the workspace"


@pytest.mark.parametrize("case", [c for c in CASES if c.sub], ids=lambda c: c.id)
def test_hostile_input_through_a_subprocess(ws: Path, case: Case) -> None:
    before = snapshot(ws)
    env = _env(ws / "cache")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "karma.cli", *case.argv], cwd=ws / "ws",
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    _check(case, proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)
    assert snapshot(ws) == before, "a failed command changed the workspace"


def test_at_least_forty_inputs_across_every_command() -> None:
    from karma.cli import OTHER, STAGES

    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert set(STAGES) | set(OTHER) <= commands, set(STAGES) | set(OTHER) - commands


# --------------------------------------------------------------------------- ranks


def test_only_the_main_process_touches_outputs(tmp_path: Path, monkeypatch: Any) -> None:
    from karma.core.stage import Stage, execute, input_path, output_path
    from karma.params import Params

    @dataclass(frozen=True, kw_only=True)
    class DemoPaths:
        src: Path = input_path("input")
        out: Path = output_path("out dir", is_dir=True)

    ran: list[Path] = []

    def run(params: Params, paths: Any) -> dict[str, Any]:
        ran.append(Path(paths.out))
        if os.environ.get("RANK", "0") == "0":  # as TRL: only the main process saves
            Path(paths.out, "data.txt").write_text("new")
        return {}

    stage = Stage(name="demo", settings=(), paths=DemoPaths, run=run)
    (tmp_path / "in.txt").write_text("x")
    paths = DemoPaths(src=tmp_path / "in.txt", out=tmp_path / "out")
    monkeypatch.setenv("RANK", "1")
    execute(stage, Params(), paths)
    assert ran[-1].name.startswith(".out.karma-tmp-rank-")  # the same staged paths as rank 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]  # nothing made or moved
    monkeypatch.setenv("RANK", "0")
    execute(stage, Params(), paths)
    assert (tmp_path / "out/data.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out"]


# --------------------------------------------------------------------------- what karma wrote


def test_outputs_dvc_records_replace_without_a_marker(tmp_path: Path) -> None:
    """A DVC checkout carries no marker (.dvcignore keeps it out of DVC's hashes): an output that
    the project's dvc.lock records is replaced; a directory beside it is not."""
    from karma.core.errors import KarmaError
    from karma.core.io import MARKER
    from karma.core.stage import Stage, execute, input_path, output_path
    from karma.params import Params

    @dataclass(frozen=True, kw_only=True)
    class Paths:
        src: Path = input_path("input")
        out: Path = output_path("out dir", is_dir=True)

    def run(params: Params, paths: Any) -> dict[str, Any]:
        Path(paths.out, "data.txt").write_text("new")
        return {}

    stage = Stage(name="demo", settings=(), paths=Paths, run=run)
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  demo:\n    cmd: x\n    outs:\n    - path: data/out\n"
    )
    for name in ("out", "other"):
        (tmp_path / "data" / name).mkdir(parents=True)
        (tmp_path / "data" / name / "data.txt").write_text("checked out")
    execute(stage, Params(), Paths(src=tmp_path / "in.txt", out=tmp_path / "data/out"))
    assert (tmp_path / "data/out/data.txt").read_text() == "new"
    assert json.loads((tmp_path / "data/out" / MARKER).read_text())["files"] == ["data.txt"]
    with pytest.raises(KarmaError, match=r"other: field 'out': output directory exists and was"):
        execute(stage, Params(), Paths(src=tmp_path / "in.txt", out=tmp_path / "data/other"))
    assert (tmp_path / "data/other/data.txt").read_text() == "checked out"


def test_outputs_whose_every_file_dvc_records_replace_without_a_marker(tmp_path: Path) -> None:
    """A log directory (dvclive/train) whose plots the lock records, committed to git without a
    marker, is replaced; one that also holds a file the lock does not record is refused."""
    from karma.core.errors import KarmaError
    from karma.core.stage import Stage, execute, input_path, output_path
    from karma.params import Params

    @dataclass(frozen=True, kw_only=True)
    class Paths:
        src: Path = input_path("input")
        out: Path = output_path("live dir", is_dir=True)

    def run(params: Params, paths: Any) -> dict[str, Any]:
        Path(paths.out, "plots").mkdir(parents=True, exist_ok=True)
        Path(paths.out, "plots", "loss.tsv").write_text("new")
        return {}

    stage = Stage(name="demo", settings=(), paths=Paths, run=run)
    (tmp_path / "in.txt").write_text("x")
    (tmp_path / "dvc.lock").write_text(
        "schema: '2.0'\nstages:\n  demo:\n    cmd: x\n    outs:\n    - path: live/plots\n"
    )
    (tmp_path / "live/plots").mkdir(parents=True)
    (tmp_path / "live/plots/loss.tsv").write_text("committed")
    execute(stage, Params(), Paths(src=tmp_path / "in.txt", out=tmp_path / "live"))
    assert (tmp_path / "live/plots/loss.tsv").read_text() == "new"
    (tmp_path / "live/.written-by-karma").unlink()
    (tmp_path / "live/notes.txt").write_text("mine")
    with pytest.raises(KarmaError, match=r"live: field 'out': output directory exists and was"):
        execute(stage, Params(), Paths(src=tmp_path / "in.txt", out=tmp_path / "live"))
    assert (tmp_path / "live/notes.txt").read_text() == "mine"


def test_atomic_file_removes_the_temporaries_of_dead_writers(tmp_path: Path) -> None:
    from karma.core.io import atomic_file

    target = tmp_path / "entry.json"
    dead = tmp_path / ".entry.json.999999999.karma-tmp"  # no such process
    alive = tmp_path / f".entry.json.{os.getppid()}.karma-tmp"  # a live writer's
    other = tmp_path / ".other.json.999999999.karma-tmp"  # another target's
    for p in (dead, alive, other):
        p.write_text("half")
    with atomic_file(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, alive.name, other.name]
    )


# --------------------------------------------------------------------------- kill tests

#: The outputs of ``karma preferences``: pairs + card (a directory), metrics, plot. The commit
#: kills leave the plot out (drawing it is most of a small run's time).
OUTPUTS = ("prefs", "pm.json", "pp.png")
COMMIT_OUTPUTS = OUTPUTS[:2]
LEFTOVER = (".karma-tmp", ".karma-old", ".karma-journal", ".karma-lock")
#: Where a run over the large input is killed: as soon as this path exists (``.`` at once; the
#: staged output: reading and pairing; its pairs: writing; the card; the metrics; the plot).
PHASES = (".", ".prefs.karma-tmp-*", ".prefs.karma-tmp-*/train_prefs.parquet",
          ".prefs.karma-tmp-*/README.md", ".pm.karma-tmp-*.json",
          ".pp.karma-tmp-*.png")  # fmt: skip


def _prefs(dataset: str, seed: int, *, plot: bool = True) -> list[str]:
    argv = ["preferences", "--kinship-dir", "kin", "--dataset", dataset, "--seed", str(seed),
            "--out", "prefs", "--metrics", "pm.json"]  # fmt: skip
    return [*argv, "--plot", "pp.png"] if plot else argv


def _state(ws: Path, name: str) -> Any:
    """An output's content: a file's digest, a directory's {file: digest}, or None."""
    p = ws / name
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        return {f.relative_to(p).as_posix(): _state(p, f.relative_to(p).as_posix())
                for f in sorted(p.rglob("*")) if f.is_file()}  # fmt: skip
    return None


def _outputs(ws: Path, names: tuple[str, ...] = OUTPUTS) -> dict[str, Any]:
    return {name: _state(ws, name) for name in names}


def _set_aside(name: str) -> str:
    return f"{name} (set aside)"


def _aside_state(ws: Path, name: str) -> Any:
    """The content of an output's set-aside copy (``.<stem>.karma-old-<run><suffix>``)."""
    stem, dot, suffix = name.partition(".")
    found = sorted(ws.glob(f".{stem}.karma-old-*{dot}{suffix}"))
    return _state(ws, found[0].name) if found else None


def _arm(k: int) -> None:
    """In a child: SIGKILL itself before the k-th file operation of the commit."""
    import pathlib

    import karma.core.stage as kp

    state = {"on": False, "n": 0}

    def wrap(fn: Any) -> Any:
        def inner(*args: Any, **kwargs: Any) -> Any:
            if state["on"]:
                state["n"] += 1
                if state["n"] == k:
                    os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return inner

    for name in ("rename", "replace", "unlink", "rmdir", "chmod"):
        setattr(os, name, wrap(getattr(os, name)))
    pathlib.Path.write_text = wrap(pathlib.Path.write_text)  # type: ignore[method-assign]
    commit = kp.commit

    def armed(*args: Any, **kwargs: Any) -> Any:
        state["on"] = True
        return commit(*args, **kwargs)

    kp.commit = armed  # type: ignore[assignment]


def _fork(argv: list[str], kill_at: int = 0) -> int:
    from karma.cli import main

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            log = os.environ.get("KARMA_TEST_CHILD_LOG")  # debugging: the children's stderr
            os.dup2(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND) if log else null, 2)
            if kill_at:
                _arm(kill_at)
            main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = 3
        os._exit(code)
    return pid


def _wait(pid: int) -> str:
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"


def kill_driver(ws: Path, backup: Path) -> dict[str, Any]:
    """Kill runs of ``karma preferences`` (forked after the imports) and record what is left.

    Commit kills: before every file operation of the commit (the small input). Time kills: at
    fractions of the run time over the large input. After each kill the next run of the
    command is recorded too (its dataset fails to parse: it recovers, then fails).
    """
    import matplotlib.pyplot  # noqa: F401  (imported before the forks: children start at once)

    import karma.pairing.figures
    import karma.pairing.kernel

    with contextlib.suppress(Exception):  # load numba's compiled kernels once, for every child
        import numpy as np

        one = np.array([1.0, 2.0])
        karma.pairing.kernel.pair_arrays(np.array([0, 2]), np.array([0, 1]), one > 0, one, one,
                                      np.eye(2), strategy="score")  # fmt: skip
    os.chdir(ws)

    def restore() -> None:
        for p in ws.iterdir():
            if p.name in OUTPUTS or any(s in p.name for s in LEFTOVER):
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        for name in OUTPUTS:
            src = backup / name
            (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / name)

    def record(kind: str, point: float, result: str, names: tuple[str, ...]) -> dict[str, Any]:
        aside = {_set_aside(n): _aside_state(ws, n) for n in names}
        after_kill = {**_outputs(ws, names), **aside}
        nxt = _wait(_fork(_prefs("bad.jsonl", 2, plot=names == OUTPUTS)))
        listing = sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))
        return {"kind": kind, "point": point, "result": result, "after_kill": after_kill,
                "next": nxt, "after_next": _outputs(ws), "listing": listing}  # fmt: skip

    report: dict[str, Any] = {"kills": []}
    for key, dataset in (("new_small", "small.parquet"), ("new_big", "big.parquet")):
        restore()
        t0 = time.perf_counter()
        assert _wait(_fork(_prefs(dataset, 1, plot=key == "new_big"))) == "exit 0"
        report[f"{key}_seconds"] = time.perf_counter() - t0
        report[key] = _outputs(ws)
    for k in range(1, 100):
        restore()
        result = _wait(_fork(_prefs("small.parquet", 1, plot=False), kill_at=k))
        report["kills"].append(record("commit", k, result, COMMIT_OUTPUTS))
        if result != "killed":
            break  # past the last operation of the commit
    for phase in PHASES:  # kill as soon as the run reaches each phase
        restore()
        pid = _fork(_prefs("big.parquet", 1))
        result = ""
        while not result and not (phase == "." or any(ws.glob(phase))):
            done, status = os.waitpid(pid, os.WNOHANG)
            result = f"exit {os.WEXITSTATUS(status)}" if done else ""
            time.sleep(0.002)
        if not result:
            os.kill(pid, signal.SIGKILL)
            result = _wait(pid)
        report["kills"].append(record("time", phase, result, OUTPUTS))
    restore()
    return report


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kill")
    ws, backup = root / "ws", root / "backup"
    ws.mkdir()
    with pytest.MonkeyPatch.context() as mp:  # karma's record of what it wrote: one cache
        mp.setenv("KARMA_CACHE_DIR", str(root / "cache"))
        return _killed(root, ws, backup)


def _killed(root: Path, ws: Path, backup: Path) -> dict[str, Any]:
    from tests.fixtures import synthetic_records

    shutil.copy(REPO / "data/origin/scores.csv", ws / "scores.csv")
    _ok(["kinship", "--scores", "scores.csv", "--out", "kin"], ws)
    synthetic_records(200, ws / "old.parquet", seed=3)
    synthetic_records(300, ws / "small.parquet", seed=1)
    synthetic_records(30_000, ws / "big.parquet", seed=2)
    (ws / "bad.jsonl").write_text('{"instruction": "q", "completions": [}\n')
    _ok(_prefs("old.parquet", 0), ws)  # the earlier output set
    backup.mkdir()
    for name in OUTPUTS:
        src = ws / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, backup / name)
    inputs = sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_hostile", "--kill-driver", str(ws), str(backup)],
        cwd=REPO, env=_env(root / "cache"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report.update(old=_outputs(ws), inputs=inputs, ws=str(ws))
    return report


def _whole(state: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
    """Each output: the old or the new one in place, or (mid-move) the old one set aside."""
    for name in old:
        here, aside = state[name], state[_set_aside(name)]
        assert here in (old[name], new[name]) or (here is None and aside == old[name]), name


def test_a_kill_at_every_step_of_the_commit_loses_nothing(killed: dict[str, Any]) -> None:
    old = {n: killed["old"][n] for n in COMMIT_OUTPUTS}
    new = {n: killed["new_small"][n] for n in COMMIT_OUTPUTS}
    assert all(old[n] != new[n] and old[n] and new[n] for n in COMMIT_OUTPUTS)
    commits = [k for k in killed["kills"] if k["kind"] == "commit"]
    assert commits[-1]["result"] == "exit 0" and len(commits) >= 10  # each step was a kill
    mixed = 0
    for kill in commits[:-1]:
        assert kill["result"] == "killed", kill["point"]
        _whole(kill["after_kill"], old, new)
        mixed += {kill["after_kill"][n] == new[n] for n in COMMIT_OUTPUTS} == {True, False}
        # the next run finishes or drops the commit: one whole set, no temporary left
        assert kill["next"] == "exit 1"
        after = {n: kill["after_next"][n] for n in COMMIT_OUTPUTS}
        assert after in (old, new), kill["point"]
        assert kill["after_next"]["pp.png"] == killed["old"]["pp.png"]  # not this run's
        assert kill["listing"] == killed["inputs"], kill["point"]
    assert mixed >= 1  # a kill between two outputs' moves (rolled forward by the next run)
    assert {(k["after_next"]["prefs"] == new["prefs"]) for k in commits[:-1]} == {True, False}


def test_a_kill_during_a_run_over_a_large_input_loses_nothing(killed: dict[str, Any]) -> None:
    old, new = killed["old"], killed["new_big"]
    assert all(old[n] != new[n] for n in OUTPUTS)
    runs = [k for k in killed["kills"] if k["kind"] == "time"]
    assert len(runs) == len(PHASES) and sum(k["result"] == "killed" for k in runs) >= 4
    for kill in runs:
        _whole(kill["after_kill"], old, new)
        assert kill["next"] == "exit 1"
        assert kill["after_next"] in (old, new), kill["point"]
        assert kill["listing"] == killed["inputs"], kill["point"]
    assert any(k["result"] == "killed" and k["after_next"] == old for k in runs)


def test_the_run_after_kills_writes_a_whole_new_set(
    killed: dict[str, Any], monkeypatch: Any
) -> None:
    ws = Path(killed["ws"])
    monkeypatch.setenv("KARMA_CACHE_DIR", str(ws.parent / "cache"))
    _ok(_prefs("small.parquet", 1, plot=False), ws)
    assert _outputs(ws, COMMIT_OUTPUTS) == {n: killed["new_small"][n] for n in COMMIT_OUTPUTS}
    assert not [p for p in ws.rglob("*") if any(s in p.name for s in LEFTOVER)]


# --------------------------------------------------------------------------- the table


def print_table() -> None:
    """Every hostile input with what karma now says (for the notes)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["KARMA_CACHE_DIR"] = str(Path(tmp, "cache"))
        build_workspace(Path(tmp, "ws"))
        for case in CASES:
            t0 = time.perf_counter()
            code, _, err = _cli(list(case.argv), Path(tmp, "ws"))
            lines = err.strip().splitlines()
            shown = lines[0] if len(lines) == 1 else f"{len(lines)} LINES: {err[-300:]!r}"
            argv = " ".join(case.argv)
            print(f"| {case.id} | `karma {argv}` | {code} | {time.perf_counter() - t0:.2f} | "
                  f"{shown.replace('|', '/')} |")  # fmt: skip
        with contextlib.suppress(OSError):
            Path(tmp, "ws/ro").chmod(0o755)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--kill-driver"]:
        print(json.dumps(kill_driver(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        print_table()
