"""karma.evaluation: metric flattening, params, task/model resolution, errors, merging, and a real
lm-eval run of the tiny model feeding the kinship stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from karma.config import from_dict, load_params, section
from karma.errors import KarmaError
from karma.evaluation import (
    EMBEDDED_TASKS,
    LM_EVAL_TASKS,
    PAPER_SCALE,
    BenchmarkConfig,
    EvaluateConfig,
    RunConfig,
    TaskSpec,
    benchmark_model,
    compare_metrics,
    evaluate_model,
    flat_key,
    flatten_metrics,
    merge_scores,
    model_fingerprint,
    parse_task_map,
    read_measured,
    resolve_model,
    resolve_tasks,
)
from karma.scores import read_scores

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "data" / "origin" / "scores.csv"

# ---------------------------------------------------------------- flattening, comparing


def test_flatten_metrics_drops_non_metrics_and_na() -> None:
    result = {
        "alias": "arc_easy",
        "name": "arc_easy",
        "sample_len": 40,
        "acc,none": 0.5,
        "acc_stderr,none": "N/A",
        "acc_norm,none": 0.25,
        "acc_norm_stderr,none": 0.07,
        "exact_match,custom-extract": 0.125,
        "bad,none": float("nan"),
        "flag,none": True,
    }
    assert flatten_metrics(result) == {
        "acc": 0.5,
        "acc_norm": 0.25,
        "acc_norm_stderr": 0.07,
        "exact_match_custom-extract": 0.125,
    }


def test_flat_key_and_result_key() -> None:
    assert flat_key("acc,none") == "acc"
    assert flat_key("exact_match,custom-extract") == "exact_match_custom-extract"
    assert TaskSpec("arc_easy", "acc").result_key == "acc,none"
    spec = TaskSpec("mmlu_pro", "exact_match,custom-extract")
    assert spec.result_key == "exact_match,custom-extract"
    assert spec.flat_metric == "exact_match_custom-extract"


def test_compare_metrics_flat_keys_and_deltas() -> None:
    base = {"arc_easy.acc": 0.25, "arc_easy.acc_stderr": 0.1, "ifeval.x": 0.5}
    policy = {"arc_easy.acc": 0.5, "arc_easy.acc_stderr": 0.2, "mmlu.acc": 0.3}
    out = compare_metrics(base, policy)
    assert out["delta.arc_easy.acc"] == 0.25
    assert out["base.ifeval.x"] == 0.5 and out["policy.mmlu.acc"] == 0.3
    assert "delta.arc_easy.acc_stderr" not in out and "delta.mmlu.acc" not in out
    assert list(out) == sorted(out)


def test_chat_template_groups() -> None:
    from karma.evaluation import _chat_groups

    gen = {"task": "g", "output_type": "generate_until"}
    mc = {"task": "m", "output_type": "multiple_choice"}
    assert _chat_groups([gen, mc, "arc_easy"], True) == [([gen, mc, "arc_easy"], True)]
    assert _chat_groups([gen, mc], False) == [([gen, mc], False)]
    assert _chat_groups([gen, mc, "ifeval"], "generative") == [
        ([gen, "ifeval"], True),
        ([mc], False),
    ]
    assert _chat_groups([mc], "generative") == [([mc], False)]


# ---------------------------------------------------------------- params


def test_shipped_params_parse_and_name_the_real_tasks() -> None:
    params = load_params(REPO / "params.yaml")
    bench = from_dict(BenchmarkConfig, section(params, "benchmark"), where="params.yaml:benchmark")
    evaluate = from_dict(EvaluateConfig, section(params, "evaluate"), where="params.yaml:evaluate")
    assert bench.tasks() == EMBEDDED_TASKS == evaluate.tasks()
    assert parse_task_map(bench.lm_eval, where="x") == LM_EVAL_TASKS
    assert {s.task for s in LM_EVAL_TASKS.values()} == {
        "ifeval",
        "mmlu_stem",
        "mmlu_pro",
        "hellaswag",
        "arc_easy",
        "arc_challenge",
    }
    assert bench.scale == PAPER_SCALE


def test_real_task_names_and_metrics_exist_in_lm_eval() -> None:
    """The real-run map names tasks whose YAML in lm-eval produces the chosen metric."""
    import lm_eval
    import yaml

    root = Path(lm_eval.__file__).parent / "tasks"
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: None)

    def load(rel: str) -> dict:
        return yaml.load((root / rel).read_text(), Loader=loader)

    files = {
        "ifeval": "ifeval/ifeval.yaml",
        "mmlu_stem": "mmlu/default/_mmlu_stem.yaml",
        "mmlu_pro": "mmlu_pro/_mmlu_pro.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
    }
    for bench, rel in files.items():
        cfg = load(rel)
        spec = LM_EVAL_TASKS[bench]
        assert spec.task == cfg.get("group", cfg.get("task")), bench
        metric, _, filt = spec.result_key.partition(",")
        if "aggregate_metric_list" in cfg:  # a group: mmlu_stem, mmlu_pro
            (agg,) = cfg["aggregate_metric_list"]
            assert agg["metric"] == metric
            assert agg.get("filter_list", "none") == filt
        else:
            metrics = load("arc/arc_easy.yaml") if bench == "arc_challenge" else cfg
            assert metric in [m["metric"] for m in metrics["metric_list"]], bench
            assert filt == "none"


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"suite": "nope"}, "unknown suite"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": 0}, "limit"),
        ({"dtype": "int3"}, "dtype"),
        ({"apply_chat_template": "some"}, "apply_chat_template"),
        ({"embedded": {"arc": {"task": "x"}}}, "exactly 'task' and 'metric'"),
        ({"embedded": {}}, "non-empty mapping"),
        ({"measured": {"bad name!": "org/m"}}, "not a valid model name"),
        ({"measured": {"m": ""}}, "hub id or a directory"),
        ({"measured": [{"name": "m", "model": "x"}]}, "wrong type"),
        ({"scale": 0}, "scale"),
        ({"scale": {"ifeval": -1}}, "scale"),
        ({"sutie": "embedded"}, "did you mean 'suite'"),
    ],
)
def test_bad_params_one_line(data: dict, match: str) -> None:
    with pytest.raises(KarmaError, match=match) as err:
        from_dict(BenchmarkConfig, data, where="params.yaml:benchmark")
    assert "\n" not in str(err.value)


def test_measured_model_lookup() -> None:
    cfg = BenchmarkConfig(measured={"a": "org/a", "b": "/models/b"})
    assert cfg.measured_model("b") == "/models/b"
    with pytest.raises(KarmaError, match=r"no measured model.*expected a, b"):
        cfg.measured_model("c")


# ---------------------------------------------------------------- tasks and models, bad input


def test_unknown_embedded_task_did_you_mean() -> None:
    with pytest.raises(KarmaError, match="did you mean 'karma_arc_easy'"):
        resolve_tasks({"arc_easy": TaskSpec("karma_arc_eazy", "acc")})


def test_metric_the_task_does_not_produce() -> None:
    with pytest.raises(KarmaError, match=r"does not produce metric 'f1'.*expected acc, acc_norm"):
        resolve_tasks({"arc_easy": TaskSpec("karma_arc_easy", "f1")})


def _write_task(directory: Path, rows: list[dict], name: str = "my_task") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / f"{name}.yaml"
    path.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: items.jsonl\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path


def test_empty_task_file_one_line(tmp_path: Path) -> None:
    path = _write_task(tmp_path, [])
    with pytest.raises(KarmaError, match="task data file is empty") as err:
        resolve_tasks({"mine": TaskSpec(str(path), "acc")})
    assert "items.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_missing_task_yaml(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="task file not found"):
        resolve_tasks({"mine": TaskSpec(str(tmp_path / "nope.yaml"), "acc")})


def test_yaml_data_files_resolve_from_any_cwd(tmp_path: Path, monkeypatch) -> None:
    path = _write_task(tmp_path / "suite", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolved = resolve_tasks({"mine": TaskSpec(os.path.relpath(path, elsewhere), "acc")})
    (cfg,) = resolved.load
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "suite" / "items.jsonl")
    assert resolved.names == {"mine": "my_task"}


@pytest.mark.slow
def test_unknown_lm_eval_task_did_you_mean() -> None:
    """Indexes lm-eval's whole registry (about 30 s)."""
    with pytest.raises(KarmaError, match="did you mean 'arc_easy'"):
        resolve_tasks({"arc_easy": TaskSpec("arc_easyy", "acc")})


def test_resolve_model(tmp_path: Path, tiny_model_dir: Path, monkeypatch) -> None:
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(KarmaError, match="model directory not found"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(KarmaError, match="model directory not found"):
        resolve_model("org/model", local_only=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(KarmaError, match="model directory not found"):
        resolve_model("models/base")  # a local path, not a hub id
    (tmp_path / "models" / "empty").mkdir()
    with pytest.raises(KarmaError, match=r"no config\.json"):
        resolve_model("models/empty")


def test_model_fingerprint_follows_content(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text("{}")
    (a / "model.safetensors").write_bytes(b"1234")
    first = model_fingerprint(str(a), "float32")
    assert model_fingerprint(str(a), "float32") == first
    assert model_fingerprint(str(a), "bfloat16") != first
    (a / "model.safetensors").write_bytes(b"1235")
    assert model_fingerprint(str(a), "float32") != first


def test_missing_model_dir_fails_before_running(tmp_path: Path) -> None:
    cfg = RunConfig(cache_dir=None)
    with pytest.raises(KarmaError, match="model directory not found"):
        evaluate_model(str(tmp_path / "models" / "policy"), EMBEDDED_TASKS, cfg)


# ---------------------------------------------------------------- merging


def test_merge_scores_with_the_paper_table() -> None:
    reported = read_scores(REPORTED)
    measured = [
        {"model": "My-Model", "ifeval": 0.5, "mmlu_pro": 0.25, "new_bench": 0.5},
        {"model": "GPT-4", "ifeval": 0.9, "mmlu_stem": 0.8},
    ]
    df = merge_scores(reported, measured, scale=PAPER_SCALE)
    assert df.columns == ["model", *reported.columns[1:], "new_bench"]
    assert df.height == reported.height + 1  # gpt-4 replaced, my-model added
    assert df["model"].to_list()[-2:] == ["my-model", "gpt-4"]
    mine = df.row(by_predicate=pl.col("model") == "my-model", named=True)
    assert mine["ifeval"] == 50.0 and mine["mmlu_pro"] == 0.25  # percent vs fraction
    assert mine["new_bench"] == 0.5 and mine["hellaswag"] is None
    gpt4 = df.row(by_predicate=pl.col("model") == "gpt-4", named=True)
    assert gpt4["ifeval"] == pytest.approx(90.0) and gpt4["arc_easy"] is None
    assert df.filter(pl.col("model") == "bard")["new_bench"].to_list() == [None]
    # nothing measured: the reported table unchanged
    assert merge_scores(reported, [], scale=100).equals(reported)


def test_merge_scores_aliases_and_duplicates() -> None:
    reported = read_scores(REPORTED)
    df = merge_scores(
        reported, [{"model": "GPT4", "ifeval": 1.0}], scale=1, aliases={"gpt4": "gpt-4"}
    )
    assert df.height == reported.height
    with pytest.raises(KarmaError, match="duplicate measured model"):
        merge_scores(reported, [{"model": "x", "ifeval": 1}, {"model": "X", "ifeval": 1}])


def test_read_measured_errors(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match="run the benchmark stage"):
        read_measured(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("[1]")
    with pytest.raises(KarmaError, match="not a score row"):
        read_measured(tmp_path / "m.json")


def test_scores_stage_script(tmp_path: Path) -> None:
    """stages/scores.py from a scratch project: reported table + one measured row."""
    (tmp_path / "data" / "origin").mkdir(parents=True)
    (tmp_path / "data" / "origin" / "scores.csv").write_text(REPORTED.read_text())
    measured = tmp_path / "data" / "benchmark" / "measured"
    measured.mkdir(parents=True)
    row = {"model": "tiny", **dict.fromkeys(EMBEDDED_TASKS, 0.5)}
    (measured / "tiny.json").write_text(json.dumps(row))
    (measured / "stale.json").write_text(json.dumps({**row, "model": "stale"}))
    (tmp_path / "params.yaml").write_text(
        "benchmark:\n  reported: data/origin/scores.csv\n  measured: {tiny: /x/tiny}\n"
    )
    out = subprocess.run(
        [sys.executable, str(REPO / "stages" / "scores.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    df = read_scores(tmp_path / "data" / "benchmark" / "scores.csv")
    assert df.height == 17 and "stale" not in df["model"].to_list()
    assert df.row(-1, named=True)["ifeval"] == 50.0
    assert df.row(-1, named=True)["mmlu_pro"] == 0.5


def test_cli_bad_task_one_line(tiny_model_dir: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "karma.cli",
            "benchmark",
            str(tiny_model_dir),
            "--task",
            "arc=karma_arc_esy:acc",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean 'karma_arc_easy'" in lines[0], out.stderr


# ---------------------------------------------------------------- real lm-eval, tiny model


@pytest.mark.slow
def test_benchmark_tiny_model_feeds_kinship(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Real lm-eval on every embedded suite (4 items each), merged with the paper table, then
    the kinship engine on the merged table."""
    cfg = RunConfig(
        limit=4,
        max_gen_toks=8,
        cache_dir=str(tmp_path / "cache"),
        samples_dir=str(tmp_path / "samples"),
    )
    row = benchmark_model(str(tiny_model_dir), EMBEDDED_TASKS, cfg, name="tiny")
    assert set(row) == {"model", *EMBEDDED_TASKS}
    assert all(0.0 <= row[b] <= 1.0 for b in EMBEDDED_TASKS)
    # 4 items: every score is a multiple of 1/4
    assert all(abs(row[b] * 4 - round(row[b] * 4)) < 1e-9 for b in EMBEDDED_TASKS)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == sorted(
        f"{s.task}.jsonl" for s in EMBEDDED_TASKS.values()
    )
    assert any((tmp_path / "cache" / "responses").iterdir())

    # same model, same settings: the response cache answers, the row is identical
    assert benchmark_model(str(tiny_model_dir), EMBEDDED_TASKS, cfg, name="tiny") == row

    merged = merge_scores(read_scores(REPORTED), [row], scale=PAPER_SCALE)
    assert merged.height == 17 and merged["model"][-1] == "tiny"
    path = tmp_path / "scores.csv"
    merged.write_csv(path)
    from karma.kinship import compute_kinship

    result = compute_kinship(read_scores(path))
    assert result.stats["n_models"] == 17
    assert "tiny" in result.models["model"].to_list()

    # evaluate: every metric of every benchmark, flat keys
    metrics = evaluate_model(str(tiny_model_dir), EMBEDDED_TASKS, cfg)
    assert metrics["arc_easy.acc_norm"] == row["arc_easy"]
    assert {"ifeval.prompt_level_strict_acc", "ifeval.inst_level_loose_acc"} <= set(metrics)
    assert all("," not in k for k in metrics)
    diff = compare_metrics(metrics, metrics)
    assert all(v == 0 for k, v in diff.items() if k.startswith("delta."))
