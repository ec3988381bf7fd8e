"""Reading UltraFeedback-schema data: local formats, the real layout, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import pytest

from karma.core.errors import KarmaError
from karma.pairing.ultrafeedback import from_records, parse_rating, read_ultrafeedback
from tests.fixtures import real_record, synthetic_records

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo/ultrafeedback_demo.jsonl"


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_demo_file_reads() -> None:
    data = read_ultrafeedback(DEMO)
    assert len(data) >= 300
    counts = data.completions.group_by("row").len()["len"]
    assert counts.min() == counts.max() == 4
    models = set(data.completions["model"])
    table = set(pl.read_csv(REPO / "data/origin/scores.csv")["model"])
    assert table <= models  # all 16 origin models appear
    assert models - table  # and at least one model outside the table
    assert data.completions["overall_score"].null_count() < data.completions.height // 10


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
def test_real_layout_all_formats_agree(tmp_path: Path, fmt: str) -> None:
    records = [real_record(i) for i in range(5)]
    records[1]["completions"][2]["overall_score"] = "N/A"  # as in the real data
    if fmt == "jsonl":
        path = _write_jsonl(tmp_path / "uf.jsonl", records)
    elif fmt == "json":
        path = tmp_path / "uf.json"
        path.write_text(json.dumps(records))
    else:
        path = tmp_path / "uf.parquet"
        # the hub's Parquet holds ratings as numbers; N/A would be null there
        records[1]["completions"][2]["overall_score"] = None
        pl.DataFrame(records).write_parquet(path)
    data = read_ultrafeedback(path)
    assert data.prompts["instruction"].to_list() == [f"Question {i}?" for i in range(5)]
    assert data.prompts["source"].to_list() == ["evol_instruct"] * 5
    c = data.completions
    assert c.height == 20
    assert c["model"].to_list()[:4] == ["gpt-4", "llama-2-70b-chat", "ultralm-65b", "starchat"]
    assert c["pos"].to_list()[:4] == [0, 1, 2, 3]
    assert c["row"].to_list()[4] == 1
    assert c["overall_score"].to_list()[:4] == [8.5, 6.0, 7.0, 3.0]
    assert c["overall_score"][6] is None
    assert c["fine_grained_score"].to_list()[:2] == [4.25, 4.25]


def test_string_ratings_and_minimal_records(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "instruction": "x",
                "completions": [
                    {"model": "a", "response": "r1", "overall_score": "7.5"},
                    {"model": "b", "response": "r2", "overall_score": " n/a "},
                    {"model": "c", "response": "r3"},
                    {"model": "d", "response": "r4", "overall_score": 3},
                ],
            },
            {"instruction": "y", "completions": []},
        ],
    )
    data = read_ultrafeedback(path)
    assert data.completions["overall_score"].to_list() == [7.5, None, None, 3.0]
    assert data.prompts["source"].to_list() == [None, None]
    assert len(data) == 2


def test_parquet_string_ratings(tmp_path: Path) -> None:
    rec = {
        "instruction": "q",
        "completions": [
            {"model": "a", "response": "r", "overall_score": "8"},
            {"model": "b", "response": "s", "overall_score": "N/A"},
        ],
    }
    path = tmp_path / "s.parquet"
    pl.DataFrame([rec]).write_parquet(path)
    assert read_ultrafeedback(path).completions["overall_score"].to_list() == [8.0, None]
    bad = tmp_path / "b.parquet"
    rec["completions"][1]["overall_score"] = "great"
    pl.DataFrame([rec]).write_parquet(bad)
    with pytest.raises(KarmaError, match=r"record 0.*completions\[1\]\.overall_score.*great"):
        read_ultrafeedback(bad)


def test_parse_rating() -> None:
    assert parse_rating("4", file="f", field="x") == 4.0
    assert parse_rating(" N/A", file="f", field="x") is None
    assert parse_rating(None, file="f", field="x") is None
    assert parse_rating(math.nan, file="f", field="x") is None
    for bad in ("high", True, [1], "inf"):
        with pytest.raises(KarmaError, match="rating is not a number"):
            parse_rating(bad, file="f", field="x")


BAD_JSONL = {
    "malformed": (
        '{"instruction": "a", "completions": []}\n{"instruction": oops}\n',
        r"malformed JSON on line 2",
    ),
    "no_instruction": ('{"completions": []}\n', r"line 1: field 'instruction': missing"),
    "no_completions": ('{"instruction": "a"}\n', r"line 1: field 'completions'"),
    "no_model": (
        '{"instruction": "a", "completions": [{"response": "r"}]}\n',
        r"completions\[0\]\.model.*without a model",
    ),
    "no_response": (
        '\n{"instruction": "a", "completions": [{"model": "m"}]}\n',
        r"line 2: field 'completions\[0\]\.response'",
    ),
    "bad_rating": (
        '{"instruction": "a", "completions": [{"model": "m", "response": "r", '
        '"overall_score": "excellent"}]}\n',
        r"overall_score.*'excellent'",
    ),
    "empty": ("", r"empty file"),
    "blank_lines": ("\n\n", r"empty file"),
    "not_object": ("[1, 2]\n", r"line 1: record is not a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl(tmp_path: Path, case: str) -> None:
    text, pattern = BAD_JSONL[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(KarmaError, match=pattern) as err:
        read_ultrafeedback(path)
    assert "\n" not in str(err.value)
    assert str(path) in str(err.value)


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="dataset not found"):
        read_ultrafeedback(tmp_path / "nope.jsonl")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(KarmaError, match="unsupported file type"):
        read_ultrafeedback(tmp_path / "x.csv")
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(KarmaError, match="empty"):
        read_ultrafeedback(tmp_path / "e.json")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(KarmaError, match="cannot read Parquet"):
        read_ultrafeedback(tmp_path / "broken.parquet")
    pl.DataFrame({"prompt": ["x"]}).write_parquet(tmp_path / "cols.parquet")
    with pytest.raises(KarmaError, match="field 'instruction': missing column"):
        read_ultrafeedback(tmp_path / "cols.parquet")
    nomodel = tmp_path / "nomodel.parquet"
    pl.DataFrame(
        [{"instruction": "q", "completions": [{"model": None, "response": "r"}]}],
        schema={
            "instruction": pl.String,
            "completions": pl.List(pl.Struct({"model": pl.String, "response": pl.String})),
        },
    ).write_parquet(nomodel)
    with pytest.raises(KarmaError, match=r"record 0.*completions\[0\]\.model"):
        read_ultrafeedback(nomodel)


def test_from_records_json_lines_in_json_file(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    _write_jsonl(path, [real_record(0), real_record(1)])
    assert len(read_ultrafeedback(path)) == 2
    data = from_records([("record 0", real_record(3))], file="mem")
    assert data.completions.height == 4


def test_hub_id_goes_through_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub code path, with ``datasets.load_dataset`` pointed at a local Parquet file."""
    import datasets

    path = tmp_path / "uf.parquet"
    pl.DataFrame([real_record(i) for i in range(3)]).write_parquet(path)
    calls = []
    real = datasets.load_dataset

    def fake(name: str, split: str = "train", **kw: object) -> datasets.Dataset:
        calls.append((name, split))
        return real("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))

    monkeypatch.setattr(datasets, "load_dataset", fake)
    data = read_ultrafeedback("openbmb/UltraFeedback", split="train")
    assert calls == [("openbmb/UltraFeedback", "train")]
    assert len(data) == 3 and data.completions.height == 12
    assert data.completions["overall_score"].to_list()[:2] == [8.5, 6.0]


def test_synthetic_records_fixture_reads_as_ultrafeedback(tmp_path: Path) -> None:
    """The benchmarks' synthetic data (tests.fixtures) is valid UltraFeedback with the quirks
    of the real set: 4 distinct models per instruction, a few blank responses, null ratings."""
    path = tmp_path / "synthetic.parquet"
    synthetic_records(200, path, seed=1)
    data = read_ultrafeedback(path)
    assert len(data) == 200 and data.completions.height == 800
    per_row = data.completions.group_by("row").agg(
        pl.len().alias("n"), pl.col("model").n_unique().alias("models")
    )
    assert per_row["n"].to_list() == [4] * 200 and per_row["models"].to_list() == [4] * 200
    assert data.prompts["instruction"][7] == "Instruction 7: explain the topic in a few sentences."
    assert 0 < data.completions["overall_score"].null_count() < 800 // 10
    assert 0 < (data.completions["response"] == "").sum() < 800 // 10
    assert data.completions["fine_grained_score"].null_count() == 0
    assert "ultralm-65b" in set(data.completions["model"])  # a model outside the score table
    # same seed, same bytes
    synthetic_records(200, tmp_path / "again.parquet", seed=1)
    assert (tmp_path / "again.parquet").read_bytes() == path.read_bytes()


def test_demo_generator_reproduces_committed_file(tmp_path: Path) -> None:
    """data/demo/make_demo.py is deterministic and the committed file is its output."""
    import subprocess
    import sys

    out = tmp_path / "demo.jsonl"
    subprocess.run(
        [sys.executable, str(REPO / "data/demo/make_demo.py"), str(out)],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == DEMO.read_bytes()
    assert DEMO.stat().st_size < 2 * 2**20
