"""karma.evaluation: metric flattening and comparison, the run settings (config model, CLI),
task/model resolution, the response cache, and real lm-eval runs of the tiny model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from karma import evaluation
from karma.config import (
    BENCHMARKS,
    PAPER_SCALE,
    SUITES,
    BenchmarkConfig,
    EvaluateConfig,
    Params,
    ScoresConfig,
    TaskSpec,
    build_params,
    load_params,
)
from karma.errors import KarmaError
from karma.evaluation import (
    benchmark_model,
    compare_metrics,
    evaluate_model,
    flat_key,
    flatten_metrics,
    model_fingerprint,
    resolve_model,
    resolve_tasks,
)
from karma.scores import merge_scores, read_measured, read_scores

REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "data" / "origin" / "scores.csv"
EMBEDDED = SUITES["embedded"]
#: a generation task and a log-likelihood task: the cheapest map that exercises both paths
TWO = {"arc_easy": EMBEDDED["arc_easy"], "ifeval": EMBEDDED["ifeval"]}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``karma <argv>`` in-process: (exit code, stdout, stderr); root logging restored after."""
    from karma.cli import main

    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("karma: error: ") and "Traceback" not in err
    return lines[0]


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
    assert TaskSpec(task="arc_easy", metric="acc").result_key == "acc,none"
    assert TaskSpec(task="arc_easy", metric="acc").flat_metric == "acc"
    spec = TaskSpec(task="mmlu_pro", metric="exact_match,custom-extract")
    assert spec.result_key == "exact_match,custom-extract"
    assert spec.flat_metric == "exact_match_custom-extract" == flat_key(spec.result_key)


def test_compare_metrics_by_hand() -> None:
    base = {
        "arc_easy.acc": 0.25,
        "arc_easy.acc_stderr": 0.1,
        "ifeval.strict": 0.5,
        "hellaswag.acc_norm": 0.75,
        "mmlu_pro.acc": 0.1,
        "retired.acc": 0.4,
    }
    policy = {
        "arc_easy.acc": 0.5,  # better
        "arc_easy.acc_stderr": 0.2,  # a stderr: compared values, never a delta
        "ifeval.strict": 0.375,  # worse
        "hellaswag.acc_norm": 0.75,  # unchanged
        "mmlu_pro.acc": 0.3,  # 0.3 - 0.1 = 0.19999999999999998 in floats: rounded to 6 digits
        "new.acc": 0.3,  # no baseline: no delta
    }
    assert compare_metrics(base, policy) == {
        "base.arc_easy.acc": 0.25,
        "base.arc_easy.acc_stderr": 0.1,
        "base.hellaswag.acc_norm": 0.75,
        "base.ifeval.strict": 0.5,
        "base.mmlu_pro.acc": 0.1,
        "base.retired.acc": 0.4,
        "delta.arc_easy.acc": 0.25,
        "delta.hellaswag.acc_norm": 0.0,
        "delta.ifeval.strict": -0.125,
        "delta.mmlu_pro.acc": 0.2,
        "policy.arc_easy.acc": 0.5,
        "policy.arc_easy.acc_stderr": 0.2,
        "policy.hellaswag.acc_norm": 0.75,
        "policy.ifeval.strict": 0.375,
        "policy.mmlu_pro.acc": 0.3,
        "policy.new.acc": 0.3,
    }
    assert list(compare_metrics(base, policy)) == sorted(compare_metrics(base, policy))
    assert compare_metrics({"a.x": 1 / 3}, {"a.x": 2 / 3}, digits=3) == {
        "base.a.x": 0.333,
        "delta.a.x": 0.333,
        "policy.a.x": 0.667,
    }


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


# ---------------------------------------------------------------- settings: suites and params


def test_shipped_params_and_suites_name_the_real_tasks() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.benchmark.task_map() == EMBEDDED == params.evaluate.task_map()
    assert list(EMBEDDED) == list(SUITES["lm_eval"]) == list(BENCHMARKS)
    assert {s.task for s in SUITES["lm_eval"].values()} == set(BENCHMARKS)
    assert {s.task for s in EMBEDDED.values()} == {f"karma_{b}" for b in BENCHMARKS}
    assert SUITES["lm_eval"]["mmlu_pro"].flat_metric == "exact_match_custom-extract"
    assert params.scores.scale == PAPER_SCALE
    assert PAPER_SCALE["mmlu_pro"] == 1.0 and PAPER_SCALE["ifeval"] == 100.0
    assert params.benchmark.max_gen_toks is None and params.evaluate.max_gen_toks == 64


def test_tasks_override_the_suite_map() -> None:
    mine = {"mine": {"task": "karma_arc_easy", "metric": "acc"}}
    cfg = BenchmarkConfig(suite="lm_eval", tasks=mine)
    assert cfg.task_map() == {"mine": TaskSpec(task="karma_arc_easy", metric="acc")}
    assert BenchmarkConfig(suite="lm_eval").task_map() == SUITES["lm_eval"]
    got = EvaluateConfig().task_map()
    got.clear()  # a copy: the suite map itself is untouched
    assert EvaluateConfig().task_map() == EMBEDDED and len(EMBEDDED) == 6


def test_real_task_names_and_metrics_exist_in_lm_eval() -> None:
    """The lm_eval suite names tasks whose YAML in lm-eval produces the chosen metric."""
    import lm_eval

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
        spec = SUITES["lm_eval"][bench]
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


# (was: hand-written range checks of BenchmarkConfig.__post_init__; now the config model's
# fields, reported with the params file and the key)
@pytest.mark.parametrize(
    ("data", "key", "match"),
    [
        ({"benchmark": {"suite": "nope"}}, "benchmark.suite", "not one of the choices"),
        ({"benchmark": {"batch_size": 0}}, "benchmark.batch_size", "1 <= batch_size"),
        ({"evaluate": {"limit": 0}}, "evaluate.limit", "1 <= limit"),
        ({"evaluate": {"max_gen_toks": 0}}, "evaluate.max_gen_toks", "1 <= max_gen_toks"),
        ({"benchmark": {"dtype": "int3"}}, "benchmark.dtype", "float32 | bfloat16"),
        ({"evaluate": {"apply_chat_template": "some"}}, "evaluate.apply_chat_template", "some"),
        ({"evaluate": {"bootstrap_iters": -1}}, "evaluate.bootstrap_iters", "0 <= "),
        ({"benchmark": {"threads": 0}}, "benchmark.threads", "out of range"),
        ({"benchmark": {"cache": "maybe"}}, "benchmark.cache", "expected bool"),
        ({"benchmark": {"tasks": {"arc": {"task": "x"}}}}, "benchmark.tasks.arc.metric", ""),
        (
            {"benchmark": {"tasks": {"arc": {"task": "", "metric": "acc"}}}},
            "benchmark.tasks.arc.task",
            "at least 1 character",
        ),
        ({"benchmark": {"tasks": []}}, "benchmark.tasks", "expected mapping"),
        ({"scores": {"measured": {"bad name!": "org/m"}}}, "scores.measured.bad name!", "pattern"),
        ({"scores": {"measured": {"m": ""}}}, "scores.measured.m", "at least 1 character"),
        ({"scores": {"measured": [{"name": "m"}]}}, "scores.measured", "expected mapping"),
        ({"scores": {"scale": 0}}, "scores.scale", "expected mapping"),
        ({"scores": {"scale": {"ifeval": -1}}}, "scores.scale.ifeval", "out of range"),
        ({"benchmark": {"sutie": "embedded"}}, "benchmark.sutie", "did you mean 'suite'"),
        # keys of the old layout are refused, not silently ignored
        (
            {"benchmark": {"cache_dir": ".cache"}},
            "benchmark.cache_dir",
            "moved to 'benchmark.cache'",
        ),
        ({"benchmark": {"reported": "x.csv"}}, "benchmark.reported", "unknown key"),
        ({"evaluate": {"embedded": {}}}, "evaluate.embedded", "unknown key"),
    ],
)
def test_bad_params_file_one_line(tmp_path: Path, data: dict, key: str, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(KarmaError) as err:
        build_params(path)
    text = str(err.value)
    assert text.startswith(f"{path}: field '{key}"), text
    assert match in text and "\n" not in text


@pytest.mark.parametrize(
    ("args", "flag", "match"),
    [
        (["benchmark", "--model", "org/m", "--batch-size", "0"], "--batch-size", "out of range"),
        (["benchmark", "--model", "org/m", "--suite", "nope"], "--suite", "embedded | lm_eval"),
        (["benchmark", "--model", "org/m", "--dtype", "int3"], "--dtype", "not one of"),
        (["benchmark", "--model", "org/m", "--tasks", "{arc: {task: x}}"], "--tasks", "required"),
        (["benchmark", "--model", "org/m", "-S", "benchmark.sutie=x"], "-S benchmark.sutie",
         "did you mean 'suite'"),
        (["evaluate", "--model", ".", "--limit", "0"], "--limit", "1 <= limit"),
        (["evaluate", "--model", ".", "--max-gen-toks", "-3"], "--max-gen-toks", "out of range"),
        (["evaluate", "--model", ".", "--apply-chat-template", "some"], "--apply-chat-template",
         "bool | generative"),
    ],
)  # fmt: skip
def test_bad_settings_on_the_command_line_one_line(
    args: list[str], flag: str, match: str, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    """Refused before any model or task is touched: a loader that fails loudly never runs."""
    monkeypatch.setattr(evaluation, "run_tasks", _never)
    code, out, err = _cli(args, capsys)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert line.startswith(f"karma: error: {flag}: ") and match in line, line


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("ran although the settings are bad")


def test_cli_bad_task_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "_load_lm", _never)
    tasks = "{arc: {task: karma_arc_esy, metric: acc}}"
    code, _, err = _cli(["benchmark", "--model", "org/m", "--tasks", tasks], capsys)
    assert code == 1
    line = _one_error_line(err)
    assert "benchmark.tasks: field 'arc.task': unknown embedded task" in line
    assert "did you mean 'karma_arc_easy'" in line


# ---------------------------------------------------------------- tasks and models, bad input


def test_unknown_embedded_task_did_you_mean() -> None:
    with pytest.raises(KarmaError, match="did you mean 'karma_arc_easy'"):
        resolve_tasks({"arc_easy": TaskSpec(task="karma_arc_eazy", metric="acc")})


def test_metric_the_task_does_not_produce() -> None:
    with pytest.raises(KarmaError, match=r"does not produce metric 'f1'.*expected acc, acc_norm"):
        resolve_tasks({"arc_easy": TaskSpec(task="karma_arc_easy", metric="f1")})


def test_no_benchmarks_is_an_error() -> None:
    with pytest.raises(KarmaError, match=r"evaluate\.tasks: no benchmarks to run"):
        resolve_tasks({}, where="evaluate.tasks")


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
        resolve_tasks({"mine": TaskSpec(task=str(path), metric="acc")})
    assert "items.jsonl" in str(err.value) and "\n" not in str(err.value)


def test_missing_task_yaml(tmp_path: Path) -> None:
    with pytest.raises(KarmaError, match=r"tasks\.mine\.task: task file not found"):
        resolve_tasks({"mine": TaskSpec(task=str(tmp_path / "nope.yaml"), metric="acc")})


def test_yaml_data_files_resolve_from_any_cwd(tmp_path: Path, monkeypatch) -> None:
    path = _write_task(tmp_path / "suite", [{"question": "q", "choices": ["a", "b"], "answer": 0}])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolved = resolve_tasks(
        {"mine": TaskSpec(task=os.path.relpath(path, elsewhere), metric="acc")}
    )
    (cfg,) = resolved.load
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "suite" / "items.jsonl")
    assert resolved.names == {"mine": "my_task"}
    assert not resolved.needs_registry


def test_task_fingerprint_follows_the_task_data(tmp_path: Path) -> None:
    """The request cache is keyed by the tasks' content: an edited item is a new key."""
    row = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path = _write_task(tmp_path, [row])
    spec = {"mine": TaskSpec(task=str(path), metric="acc")}
    first = resolve_tasks(spec).fingerprint
    assert resolve_tasks(spec).fingerprint == first and len(first) == 16
    (tmp_path / "items.jsonl").write_text(json.dumps({**row, "answer": 1}) + "\n")
    assert resolve_tasks(spec).fingerprint != first


@pytest.mark.slow
def test_unknown_lm_eval_task_did_you_mean() -> None:
    """Indexes lm-eval's whole registry (about 30 s)."""
    with pytest.raises(KarmaError, match="did you mean 'arc_easy'"):
        resolve_tasks({"arc_easy": TaskSpec(task="arc_easyy", metric="acc")})


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
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert model_fingerprint(str(b), "float32") == first  # content, not the path
    (a / "model.safetensors").write_bytes(b"1235")
    assert model_fingerprint(str(a), "float32") != first


def test_missing_model_dir_fails_before_running(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(evaluation, "_load_lm", _never)
    with pytest.raises(KarmaError, match="model directory not found"):
        evaluate_model(str(tmp_path / "models" / "policy"), EvaluateConfig(cache=False))


@pytest.mark.parametrize(
    ("extra", "flag", "match"),
    [
        (["--model", "{tmp}/missing"], "--model", "input not found"),
        (["--model", "{tmp}/model", "--baseline", "{tmp}/nope.json"], "--baseline", "not found"),
        (["--model", "{tmp}/model", "--out", "{tmp}/m.txt"], "--out", "wrong output suffix"),
        (["--model", "{tmp}/model", "--out", "{tmp}/model/m.json"], "--out", "lies inside"),
    ],
)
def test_evaluate_paths_refused_one_line(
    tmp_path: Path,
    extra: list[str],
    flag: str,
    match: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch,
) -> None:
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(evaluation, "run_tasks", _never)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = _cli(["evaluate", *(a.format(tmp=tmp_path) for a in extra)], capsys)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert f"field '{flag}'" in line and match in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- merging (karma.scores)


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
    assert df.row(by_predicate=pl.col("model") == "gpt-4", named=True)["ifeval"] == 1.0
    with pytest.raises(KarmaError, match="duplicate measured model"):
        merge_scores(reported, [{"model": "x", "ifeval": 1}, {"model": "X", "ifeval": 1}])


def test_read_measured_errors(tmp_path: Path) -> None:
    with pytest.raises(
        KarmaError, match=r"m\.json: measured score row not found \(run its benchmark stage\)"
    ):
        read_measured(tmp_path / "m.json")
    (tmp_path / "m.json").write_text("[1]")
    with pytest.raises(KarmaError, match="not a JSON object"):
        read_measured(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"ifeval": 0.5}')
    with pytest.raises(KarmaError, match=r"field 'model': not a score row"):
        read_measured(tmp_path / "m.json")
    (tmp_path / "m.json").write_text('{"model": "x", "ifeval": 0.5}')
    assert read_measured(tmp_path / "m.json") == {"model": "x", "ifeval": 0.5}


def test_scores_stage_script(tmp_path: Path) -> None:
    """stages/scores.py from a scratch project: reported table + one measured row (the stale
    row of a model no longer in scores.measured is not merged)."""
    (tmp_path / "data" / "origin").mkdir(parents=True)
    (tmp_path / "data" / "origin" / "scores.csv").write_text(REPORTED.read_text())
    measured = tmp_path / "data" / "benchmark" / "measured"
    measured.mkdir(parents=True)
    row = {"model": "tiny", **dict.fromkeys(BENCHMARKS, 0.5)}
    (measured / "tiny.json").write_text(json.dumps(row))
    (measured / "stale.json").write_text(json.dumps({**row, "model": "stale"}))
    (tmp_path / "params.yaml").write_text(
        "scores:\n  reported: data/origin/scores.csv\n  measured: {tiny: /x/tiny}\n"
    )
    cmd = [
        sys.executable,
        str(REPO / "stages" / "scores.py"),
        "--measured-dir",
        "data/benchmark/measured",
        "--out",
        "data/benchmark/scores.csv",
    ]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    df = read_scores(tmp_path / "data" / "benchmark" / "scores.csv")
    assert df.height == 17 and "stale" not in df["model"].to_list()
    assert df.row(-1, named=True)["model"] == "tiny"
    assert df.row(-1, named=True)["ifeval"] == 50.0
    assert df.row(-1, named=True)["mmlu_pro"] == 0.5
    # the old layout's key is refused with one line naming params.yaml and the key
    (tmp_path / "params.yaml").write_text("benchmark:\n  reported: data/origin/scores.csv\n")
    bad = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 1
    assert _one_error_line(bad.stderr).startswith(
        "karma: error: params.yaml: field 'benchmark.reported': unknown key"
    )


# ---------------------------------------------------------------- real lm-eval, tiny model


def _refuse_to_compute(monkeypatch: pytest.MonkeyPatch, *, from_load: int) -> list[str]:
    """Patch the model loader: from load number ``from_load`` on, the loaded model raises on
    any inference call, so only lm-eval's response cache can answer. Returns the load log.

    (The model is still loaded on a full cache hit: lm-eval needs its tokenizer and chat
    template to build the requests that it looks up.)
    """
    real = evaluation._load_lm
    loads: list[str] = []

    def refuse(requests: list, *args: Any, **kwargs: Any) -> list:
        raise AssertionError(f"cache miss: the model was asked {len(requests)} requests")

    def load(model: str, cfg: Any) -> Any:
        lm = real(model, cfg)
        loads.append(model)
        if len(loads) >= from_load:
            for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, name, refuse)
        return lm

    monkeypatch.setattr(evaluation, "_load_lm", load)
    return loads


def test_response_cache_answers_without_running_the_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = EvaluateConfig(limit=2, tasks=TWO)
    loads = _refuse_to_compute(monkeypatch, from_load=2)
    first = evaluate_model(str(tiny_model_dir), cfg)
    assert set(first) == {
        "arc_easy.acc",
        "arc_easy.acc_norm",
        "ifeval.inst_level_loose_acc",
        "ifeval.inst_level_strict_acc",
        "ifeval.prompt_level_loose_acc",
        "ifeval.prompt_level_strict_acc",
    }
    # the second model cannot compute: every response comes from the cache
    assert evaluate_model(str(tiny_model_dir), cfg) == first
    assert len(loads) == 2
    # without the cache the same refusing model is asked, so the check above can fail
    with pytest.raises(AssertionError, match="cache miss"):
        evaluate_model(str(tiny_model_dir), EvaluateConfig(limit=2, tasks=TWO, cache=False))
    # the cache is keyed by the model's content: a changed copy is a miss
    other = tmp_path / "changed"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "karma_test_note": "changed"}))
    with pytest.raises(AssertionError, match="cache miss"):
        evaluate_model(str(other), cfg)
    # ... and by the settings that change responses
    with pytest.raises(AssertionError, match="cache miss"):
        evaluate_model(str(tiny_model_dir), EvaluateConfig(limit=2, tasks=TWO, max_gen_toks=9))


def test_evaluate_cli_against_a_baseline(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``karma evaluate`` writes flat metrics; with ``--baseline`` base.*, policy.* and
    delta.* keys, the deltas worked out by hand from a shifted copy of the metrics."""
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    model = str(tiny_model_dir)
    plain = tmp_path / "metrics" / "base.json"
    code, out, err = _cli(
        ["evaluate", "--model", model, "--out", str(plain), "--limit", "2"], capsys
    )
    assert code == 0, err
    policy = json.loads(plain.read_text())
    assert json.loads(out) == policy
    assert {f"{b}.{s.flat_metric}" for b, s in EMBEDDED.items()} <= set(policy)
    assert all(k.split(".")[0] in BENCHMARKS and "," not in k for k in policy)
    assert all(0 <= v <= 1 and (2 * v).is_integer() for v in policy.values())  # 2 items each

    baseline = {
        **policy,
        "arc_easy.acc_norm": policy["arc_easy.acc_norm"] - 0.25,  # policy is 0.25 better
        "hellaswag.acc_norm": policy["hellaswag.acc_norm"] + 0.5,  # policy is 0.5 worse
        "retired.acc": 0.125,  # only in the baseline: base.* only
    }
    base_file = tmp_path / "baseline.json"
    base_file.write_text(json.dumps(baseline))
    compared = tmp_path / "metrics" / "evaluate.json"
    loads = _refuse_to_compute(monkeypatch, from_load=1)  # same settings: all from the cache
    argv = ["evaluate", "--model", model, "--out", str(compared), "--limit", "2"]
    code, out, err = _cli([*argv, "--baseline", str(base_file)], capsys)
    assert code == 0, err
    assert len(loads) == 1
    got = json.loads(compared.read_text())
    assert json.loads(out) == got
    expected = {
        **{f"base.{k}": v for k, v in baseline.items()},
        **{f"policy.{k}": v for k, v in policy.items()},
        **{f"delta.{k}": 0.0 for k in policy},
        "delta.arc_easy.acc_norm": 0.25,
        "delta.hellaswag.acc_norm": -0.5,
    }
    assert got == expected


def test_benchmark_cli_writes_one_row(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The row holds each benchmark's suite metric: the same numbers ``evaluate`` reports."""
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    out_file = tmp_path / "measured" / "x.json"
    argv = ["benchmark", "--model", str(tiny_model_dir), "--name", "x", "--out", str(out_file)]
    code, out, err = _cli([*argv, "--limit", "2", "--max-gen-toks", "64"], capsys)
    assert code == 0, err
    row = json.loads(out_file.read_text())
    assert json.loads(out) == row
    assert set(row) == {"model", *BENCHMARKS} and row["model"] == "x"
    assert read_measured(out_file) == row
    # the evaluate settings with the same limit and generation cap: answered from the cache
    _refuse_to_compute(monkeypatch, from_load=1)
    metrics = evaluate_model(str(tiny_model_dir), EvaluateConfig(limit=2))
    assert {b: metrics[f"{b}.{s.flat_metric}"] for b, s in EMBEDDED.items()} == {
        b: row[b] for b in BENCHMARKS
    }


@pytest.mark.slow
def test_benchmark_tiny_model_feeds_scores_and_kinship(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real lm-eval on every embedded suite (4 items each, per-sample logs), the scores stage
    merging the row into the paper table, then the kinship engine on the merged table."""
    from karma.kinship import compute_kinship
    from karma.pipeline import execute
    from karma.scores import STAGE as SCORES_STAGE
    from karma.scores import ScoresPaths

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    samples = tmp_path / "samples"
    cfg = BenchmarkConfig(limit=4, max_gen_toks=8, samples_dir=str(samples))
    row = benchmark_model(str(tiny_model_dir), cfg, name="tiny")
    assert list(row) == ["model", *BENCHMARKS] and row["model"] == "tiny"
    assert all(0.0 <= row[b] <= 1.0 for b in BENCHMARKS)
    # 4 items: every score is a multiple of 1/4
    assert all((row[b] * 4).is_integer() for b in BENCHMARKS)
    logs = {p.name: p.read_text().splitlines() for p in samples.iterdir()}
    assert sorted(logs) == sorted(f"{s.task}.jsonl" for s in EMBEDDED.values())
    assert all(len(lines) == 4 for lines in logs.values())
    assert all("doc" in json.loads(line) for lines in logs.values() for line in lines)

    measured = tmp_path / "measured"
    measured.mkdir()
    (measured / "tiny.json").write_text(json.dumps(row))
    params = Params(scores=ScoresConfig(reported=str(REPORTED), measured={"tiny": "x"}))
    scores_csv = tmp_path / "scores.csv"
    stats = execute(SCORES_STAGE, params, ScoresPaths(measured_dir=measured, out=scores_csv))
    assert stats == {"models": 17, "benchmarks": 6, "measured": 1}
    merged = read_scores(scores_csv)
    tiny = merged.row(-1, named=True)
    assert tiny["model"] == "tiny" and tiny["mmlu_pro"] == row["mmlu_pro"]
    assert tiny["ifeval"] == pytest.approx(100 * row["ifeval"])
    result = compute_kinship(merged)
    assert result.stats["n_models"] == 17
    assert "tiny" in result.models["model"].to_list()

    # evaluate with the same settings: every flat metric, the suite metric equal to the row's
    _refuse_to_compute(monkeypatch, from_load=1)
    metrics = evaluate_model(str(tiny_model_dir), EvaluateConfig(limit=4, max_gen_toks=8))
    assert {b: metrics[f"{b}.{s.flat_metric}"] for b, s in EMBEDDED.items()} == {
        b: row[b] for b in BENCHMARKS
    }
    assert {"ifeval.prompt_level_strict_acc", "ifeval.inst_level_loose_acc"} <= set(metrics)
    assert all("," not in k for k in metrics)
