"""karma.kinship.scores: wide/long tables in CSV, Parquet and JSON; canonical ids; clear errors; the
scores stage's settings and output through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from karma.core.errors import KarmaError
from karma.kinship.scores import read_scores, write_scores
from tests.fixtures import run_karma as _cli

REPO = Path(__file__).resolve().parents[1]
ORIGIN = REPO / "data" / "origin" / "scores.csv"
PAPER_HEADER = "model,ifeval,mmlu_stem,mmlu_pro,hellaswag,arc_easy,arc_challenge"


def test_origin_table_is_the_papers() -> None:
    df = read_scores(ORIGIN)
    assert ORIGIN.read_text().splitlines()[0] == PAPER_HEADER
    assert df.height == 16
    assert df.columns == PAPER_HEADER.split(",")
    assert df.schema["ifeval"] == pl.Float64
    row = dict(zip(df.columns, df.row(df["model"].to_list().index("bard")), strict=True))
    assert row == {
        "model": "bard",
        "ifeval": 89.33,
        "mmlu_stem": 71.80,
        "mmlu_pro": 0.59,
        "hellaswag": 84.70,
        "arc_easy": 84.43,
        "arc_challenge": 77.13,
    }
    assert df.filter(pl.col("model") == "starchat")["arc_challenge"].item() == 9.07
    assert df.null_count().sum_horizontal().item() == 0


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_wide_csv_case_insensitive_ids_aliases_and_missing(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "s.csv",
        "Model,IFEval,MMLU\n GPT-4 ,80,NA\nGemini-1.5-Flash,70.5,\nLlama,,n/a\n",
    )
    df = read_scores(p, aliases={"gemini-1.5-FLASH": "Bard"})
    assert df.columns == ["model", "ifeval", "mmlu"]
    assert df["model"].to_list() == ["gpt-4", "bard", "llama"]
    assert df["ifeval"].to_list() == [80.0, 70.5, None]
    assert df["mmlu"].null_count() == 3


def test_long_and_wide_agree_across_formats(tmp_path: Path) -> None:
    wide = read_scores(ORIGIN)
    long_rows = [
        {"Benchmark": b, "MODEL": m, "score": v}
        for m, *vals in wide.rows()
        for b, v in zip(wide.columns[1:], vals, strict=True)
    ]
    pl.DataFrame(long_rows).write_csv(tmp_path / "long.csv")
    pl.DataFrame(long_rows).write_parquet(tmp_path / "long.parquet")
    (tmp_path / "long.json").write_text(json.dumps(long_rows))
    (tmp_path / "wide.jsonl").write_text(
        "\n".join(json.dumps(dict(zip(wide.columns, r, strict=True))) for r in wide.rows())
    )
    mapping = {m: dict(zip(wide.columns[1:], vals, strict=True)) for m, *vals in wide.rows()}
    (tmp_path / "map.json").write_text(json.dumps(mapping))
    wide.write_parquet(tmp_path / "wide.parquet")
    for name in ("long.csv", "long.parquet", "long.json", "wide.jsonl", "map.json", "wide.parquet"):
        got = read_scores(tmp_path / name)
        assert got.equals(wide), name


def test_parquet_nan_is_missing(tmp_path: Path) -> None:
    pl.DataFrame({"model": ["a", "b"], "x": [1.0, math.nan], "y": [None, 2.0]}).write_parquet(
        tmp_path / "t.parquet"
    )
    df = read_scores(tmp_path / "t.parquet")
    assert df["x"].to_list() == [1.0, None]
    assert df["y"].to_list() == [None, 2.0]


def test_write_scores_roundtrip(tmp_path: Path) -> None:
    df = read_scores(ORIGIN)
    write_scores(df, tmp_path / "o.csv")
    write_scores(df, tmp_path / "sub" / "o.parquet")  # creates the parent
    assert (tmp_path / "o.csv").read_text().splitlines()[0] == PAPER_HEADER
    assert (tmp_path / "sub" / "o.parquet").read_bytes()[:4] == b"PAR1"
    assert read_scores(tmp_path / "o.csv").equals(df)
    assert read_scores(tmp_path / "sub" / "o.parquet").equals(df)


@pytest.mark.parametrize(
    ("name", "text", "aliases", "pattern"),
    [
        ("dup.csv", "model,x\na,1\nA,2\n", None, r"line 3: duplicate model 'a'"),
        ("alias.csv", "model,x\nbard,1\ngemini,2\n", {"Gemini": "BARD"}, "duplicate model 'bard'"),
        (
            "nonnum.csv",
            "model,x,y\na,1,2\nb,3,abc\n",
            None,
            r"nonnum.csv: field 'y': line 3 \(model 'b'\): non-numeric score \(got 'abc'",
        ),
        ("inf.csv", "model,x\na,1\nb,inf\n", None, "non-numeric score"),
        ("nobench.csv", "model\na\nb\n", None, "no benchmark columns"),
        ("one.csv", "model,x\na,1\n", None, "fewer than two models"),
        ("nomodel.csv", "name,x\na,1\nb,2\n", None, "no model column"),
        ("empty_id.csv", "model,x\na,1\n,2\n", None, "line 3: empty model id"),
        ("dupcol.csv", "model,x,X\na,1,2\nb,3,4\n", None, "duplicate benchmark column"),
        ("t.xlsx", "whatever", None, "unsupported score table format"),
        (
            "long_dup.csv",
            "model,benchmark,score\na,x,1\nA,x,2\nb,x,1\n",
            None,
            "duplicate model 'a' for benchmark 'x'",
        ),
        (
            "long_bad.json",
            '[{"model": "a", "benchmark": "x", "score": "high"}]',
            None,
            r"record 1 \(model 'a', benchmark 'x'\): non-numeric score",
        ),
        ("bad.json", '{"a": 3}', None, "JSON mapping values must be objects"),
    ],
)
def test_errors_are_one_clear_line(
    tmp_path: Path, name: str, text: str, aliases: dict[str, str] | None, pattern: str
) -> None:
    p = _write(tmp_path, name, text)
    with pytest.raises(KarmaError, match=pattern) as info:
        read_scores(p, aliases)
    assert "\n" not in str(info.value)
    assert name in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="score table not found"):
        read_scores(tmp_path / "absent.csv")


# --------------------------------------------------------------------------- stage via the CLI


def test_scores_stage_writes_the_table_with_aliases(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "measured").mkdir()
    base = ["scores", "--measured-dir", str(tmp_path / "measured"), "--reported", str(ORIGIN)]
    for name in ("t.csv", "t.parquet"):
        code, out, err = _cli([*base, "--out", str(tmp_path / name)], capsys)
        assert code == 0, err
        assert json.loads(out) == {"models": 16, "benchmarks": 6, "measured": 0}
        assert read_scores(tmp_path / name).equals(read_scores(ORIGIN)), name
    # scores.aliases (moved from similarity) reaches the reader
    code, out, err = _cli(
        [*base, "--out", str(tmp_path / "a.csv"), "--aliases", '{"GPT-4": "gpt4-renamed"}'], capsys
    )
    assert code == 0, err
    got = read_scores(tmp_path / "a.csv")["model"].to_list()
    assert got == ["gpt4-renamed" if m == "gpt-4" else m for m in read_scores(ORIGIN)["model"]]


@pytest.mark.parametrize(
    ("extra", "code", "pattern"),
    [
        (["--out", "{tmp}/o.xlsx"], 1, "o.xlsx: field '--out': wrong output suffix (got '.xlsx';"
         " expected .csv or .parquet or .pq)"),
        (["--out", "{tmp}/o"], 1, "field '--out': wrong output suffix (got '(none)'"),
        (["--out", "{tmp}/o.csv", "--reported", "{tmp}/absent.csv"], 1,
         "absent.csv: score table not found"),
        (["--out", "{tmp}/o.csv", "-S", "scores.scale.ifeval=0"], 1,
         "-S scores.scale.ifeval: out of range (got 0;"),
        (["--out", "{tmp}/o.csv", "-S", "scores.alias={}"], 1,
         "-S scores.alias: unknown key; did you mean 'aliases'?"),
        (["--out", "{tmp}/o.csv", "--measured-x", "1"], 2, "No such option '--measured-x'"),
    ],
)  # fmt: skip
def test_scores_stage_errors_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], code: int, pattern: str
) -> None:
    (tmp_path / "measured").mkdir()
    argv = ["scores", "--measured-dir", str(tmp_path / "measured"), "--reported", str(ORIGIN)]
    got, out, err = _cli([*argv, *(a.replace("{tmp}", str(tmp_path)) for a in extra)], capsys)
    lines = err.strip().splitlines()
    assert got == code, err
    assert out == ""
    assert len(lines) == 1 and lines[0].startswith("karma: error: "), err
    assert pattern in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["measured"]  # nothing written
