"""karma.evaluation.evaluate: metric flattening and comparison, the run settings (config model,
CLI),
task/model resolution, the response cache, per-item results, intervals and paired deltas,
the protocol check of the scores stage, and real lm-eval runs of the tiny model (against
lm-eval's command line, and with two processes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import yaml

from karma.core.errors import KarmaError
from karma.core.settings import BENCHMARKS, PAPER_SCALE
from karma.evaluation import lmeval
from karma.evaluation.lmeval import (
    benchmark_model,
    evaluate_model,
    model_fingerprint,
    resolve_model,
)
from karma.evaluation.metrics import compare_metrics, flat_key, flatten_metrics
from karma.evaluation.settings import BenchmarkConfig, EvaluateConfig, TaskSpec, suites
from karma.evaluation.taskconfig import TASKS_DIR, resolve_tasks
from karma.kinship.scores import merge_scores, read_measured, read_scores
from karma.kinship.settings import ScoresConfig
from karma.params import Params, build_params, load_params
from tests.fixtures import one_error_line as _one_error_line
from tests.fixtures import run_karma as _cli

SUITES = suites()


REPO = Path(__file__).resolve().parents[1]
REPORTED = REPO / "data" / "origin" / "scores.csv"
EMBEDDED = SUITES["embedded"].tasks
PAPER_MINI = SUITES["embedded_paper"].tasks
#: a generation task and a log-likelihood task: the cheapest map that exercises both paths
TWO = {"arc_easy": EMBEDDED["arc_easy"], "ifeval": EMBEDDED["ifeval"]}
HEADLINE = ("score", "ci_low", "ci_high", "stderr", "n")


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
    # headline keys get paired deltas elsewhere (compare_runs); meta keys are not compared
    head = {f"a.{k}": 0.5 for k in HEADLINE} | {"meta.suite": "embedded", "a.acc": None}
    assert compare_metrics(head, {**head, "a.score": 0.75}) == {
        **{f"base.a.{k}": 0.5 for k in HEADLINE},
        **{f"policy.a.{k}": 0.5 for k in HEADLINE},
        "policy.a.score": 0.75,
        "base.a.acc": None,
        "policy.a.acc": None,
    }


def test_chat_template_groups() -> None:
    from karma.evaluation.lmeval import chat_groups

    gen = {"task": "g", "output_type": "generate_until"}
    mc = {"task": "m", "output_type": "multiple_choice"}
    assert chat_groups([gen, mc, "arc_easy"], True) == [([gen, mc, "arc_easy"], True)]
    assert chat_groups([gen, mc], False) == [([gen, mc], False)]
    assert chat_groups([gen, mc, "ifeval"], "generative") == [
        ([gen, "ifeval"], True),
        ([mc], False),
    ]
    assert chat_groups([mc], "generative") == [([mc], False)]


# ---------------------------------------------------------------- settings: suites and params


def test_shipped_params_and_suites_name_the_real_tasks() -> None:
    """The CPU default: evaluate on the log-likelihood mini suite (IFEval capped at 64 tokens),
    benchmark origin models on the paper-protocol mini suite (the reported table's protocol)."""
    params = load_params(REPO / "params.yaml")
    assert params.evaluate.task_map() == EMBEDDED and params.evaluate.protocol_name() == "loglik"
    assert params.benchmark.task_map() == PAPER_MINI
    assert params.benchmark.protocol_name() == "paper" == params.scores.reported_protocol
    lm_eval = SUITES["lm_eval"].tasks
    assert list(EMBEDDED) == list(lm_eval) == list(PAPER_MINI) == list(BENCHMARKS)
    assert {s.task for s in lm_eval.values()} == set(BENCHMARKS)
    assert {s.task for s in EMBEDDED.values()} == {f"karma_{b}" for b in BENCHMARKS}
    assert lm_eval["mmlu_pro"].flat_metric == "exact_match_custom-extract"
    assert params.scores.scale == PAPER_SCALE
    assert PAPER_SCALE["mmlu_pro"] == 1.0 and PAPER_SCALE["ifeval"] == 100.0
    assert params.benchmark.max_gen_toks is None and params.evaluate.max_gen_toks is None
    assert params.evaluate.gen_cap() == 64 and params.benchmark.gen_cap() is None
    assert EvaluateConfig(max_gen_toks=9).gen_cap() == 9
    assert EvaluateConfig(tasks=TWO).gen_cap() is None  # the suite's cap is the suite's
    assert EvaluateConfig(tasks=TWO).protocol_name() == "custom"
    assert EvaluateConfig(tasks=TWO, protocol="paper").protocol_name() == "paper"
    # seed replicates re-run training and the policy's evaluation, never the base model's
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "seed" not in stages["evaluate_base"]["params"]
    assert "seed" not in stages["evaluate"]["params"] and "seed" in stages["train"]["params"]
    assert {"evaluate.n_boot", "evaluate.bootstrap_seed"} <= set(stages["evaluate"]["params"])
    assert not {"evaluate.n_boot", "evaluate.bootstrap_seed"} & set(
        stages["evaluate_base"]["params"]
    )


def test_tasks_override_the_suite_map() -> None:
    mine = {"mine": {"task": "karma_arc_easy", "metric": "acc"}}
    cfg = BenchmarkConfig(suite="lm_eval", tasks=mine)
    assert cfg.task_map() == {"mine": TaskSpec(task="karma_arc_easy", metric="acc")}
    assert BenchmarkConfig(suite="lm_eval").task_map() == SUITES["lm_eval"].tasks
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
        spec = SUITES["lm_eval"].tasks[bench]
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


def test_paper_suite_runs_karmas_hub_tasks_in_mmlu_pros_framework() -> None:
    """Every benchmark of the paper suite is one of karma's hub tasks
    (karma/evaluation/tasks/paper/hub), zero-shot; the multiple-choice ones are scored by
    MMLU-Pro's extraction with its fallbacks (custom-extract), not a registry task's pattern."""
    import lm_eval

    from karma.evaluation.extract import mmlu_pro_fallback
    from karma.evaluation.taskconfig import embedded_tasks, load_task_config

    root = Path(lm_eval.__file__).parent / "tasks"
    loader = type("L", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda ld, node: None)
    paper, tasks = SUITES["paper"].tasks, embedded_tasks()
    assert {b: s.task for b, s in paper.items()} == {b: f"karma_paper_hub_{b}" for b in paper}
    for bench, spec in paper.items():
        cfg = load_task_config(tasks[spec.task])
        assert cfg["output_type"] == "generate_until" and cfg["num_fewshot"] == 0, bench
        if bench == "ifeval":
            continue
        assert spec.result_key == "exact_match,custom-extract", bench
        (custom, _) = cfg["filter_list"][0]["filter"]
        assert custom["filter_fn"] is mmlu_pro_fallback, bench
    assert SUITES["paper"].num_fewshot == 0  # one shot count for every task, stated
    assert SUITES["lm_eval"].protocol == "mixed"  # generative MMLU-Pro and IFEval
    # karma's IFEval copy is lm-eval's ifeval but for the per-item
    # seeding
    hub = REPO / "karma/evaluation/tasks/paper/hub"
    ours = yaml.load((hub / "karma_paper_hub_ifeval.yaml").read_text(), Loader=loader)
    theirs = yaml.load((root / "ifeval/ifeval.yaml").read_text(), Loader=loader)
    assert {k: v for k, v in ours.items() if k != "task"} == {
        k: v for k, v in theirs.items() if k != "task"
    }


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
        ({"evaluate": {"backend": "tgi"}}, "evaluate.backend", "hf | vllm"),
        ({"evaluate": {"model_args": {"dtype": "bf16"}}}, "evaluate.model_args",
         "'dtype' is set by the dtype setting"),
        ({"evaluate": {"backend": "vllm", "num_processes": 2}}, "evaluate",
         "num_processes must be 1 with backend vllm"),
        ({"evaluate": {"protocol": "paper"}}, "evaluate",
         "suite 'embedded' is protocol 'loglik'"),
        ({"evaluate": {"n_boot": 10}}, "evaluate.n_boot", "100 <= n_boot"),
        ({"evaluate": {"num_processes": 0}}, "evaluate.num_processes", "out of range"),
        ({"scores": {"reported_protocol": "prompted"}}, "scores.reported_protocol",
         "loglik | paper | mixed | custom"),
        ({"benchmark": {"suite": "papr"}}, "benchmark.suite", "did you mean 'paper'"),
    ],
)  # fmt: skip
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
        (["benchmark", "--model", "org/m", "--suite", "nope"], "--suite",
         "embedded | embedded_paper | lm_eval | paper"),
        (["evaluate", "--model", ".", "--backend", "vllm", "--num-processes", "2"],
         "--backend or --num-processes", "num_processes must be 1 with backend vllm"),
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
    monkeypatch.setattr(lmeval, "run_tasks", _never)
    code, out, err = _cli(args, capsys)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert line.startswith(f"karma: error: {flag}: ") and match in line, line


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("ran although the settings are bad")


def test_cli_bad_task_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    monkeypatch.setattr(lmeval, "load_lm", _never)
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
    monkeypatch.setattr(lmeval, "load_lm", _never)
    with pytest.raises(KarmaError, match="model directory not found"):
        evaluate_model(str(tmp_path / "models" / "policy"), EvaluateConfig(cache=False))


@pytest.mark.parametrize(
    ("extra", "flag", "match"),
    [
        (["--model", "{tmp}/missing"], "--model", "input not found"),
        (["--model", "{tmp}/model", "--baseline", "{tmp}/nope"], "--baseline", "not found"),
        (["--model", "{tmp}/model", "--baseline", "{tmp}/m.json"], "--baseline", "not a directory"),
        (
            ["--model", "{tmp}/model", "--metrics", "{tmp}/m.txt"],
            "--metrics",
            "wrong output suffix",
        ),
        (["--model", "{tmp}/model", "--out", "{tmp}/model/eval"], "--out", "lies inside"),
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
    (tmp_path / "m.json").write_text("{}")
    monkeypatch.setattr(lmeval, "run_tasks", _never)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = _cli(["evaluate", *(a.format(tmp=tmp_path) for a in extra)], capsys)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    assert f"field '{flag}'" in line and match in line, line
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# ---------------------------------------------------------------- merging (karma.kinship.scores)


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
    row = {"model": "tiny", **dict.fromkeys(BENCHMARKS, 0.5), "meta.protocol": "paper"}
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


# ---------------------------------------------------------------- protocols (karma.kinship.scores)


def _scores_project(tmp_path: Path, protocol: str | None) -> tuple[Path, list[str]]:
    """A scratch project for stages/scores.py: the paper table + one measured row."""
    (tmp_path / "data" / "origin").mkdir(parents=True)
    (tmp_path / "data" / "origin" / "scores.csv").write_text(REPORTED.read_text())
    measured = tmp_path / "data" / "benchmark" / "measured"
    measured.mkdir(parents=True)
    row = {"model": "Tiny", **dict.fromkeys(BENCHMARKS, 0.5)}
    if protocol is not None:
        row["meta.protocol"] = protocol
    (measured / "tiny.json").write_text(json.dumps(row))
    return measured, [
        "scores",
        "--measured-dir",
        str(measured),
        "--out",
        str(tmp_path / "scores.csv"),
        "--protocols",
        str(tmp_path / "protocols.json"),
        "-S",
        "scores.reported=" + str(tmp_path / "data" / "origin" / "scores.csv"),
        "-S",
        "scores.measured={tiny: x}",
    ]


@pytest.mark.parametrize("protocol", ["loglik", None])
def test_scores_refuses_to_mix_protocols_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], protocol: str | None
) -> None:
    """A log-likelihood row (or a row that does not say) next to the paper's prompted table:
    refused with one line naming the row's file, its protocol and the param that allows it;
    nothing written. With scores.mix_protocols: true it merges, and the protocols file says
    which row came from which protocol."""
    measured, argv = _scores_project(tmp_path, protocol)
    code, out, err = _cli(argv, capsys)
    assert code == 1 and out == ""
    line = _one_error_line(err)
    shown = protocol or "unknown"
    assert line == (
        f"karma: error: {measured / 'tiny.json'}: field 'meta.protocol': scored with protocol "
        f"'{shown}', the reported table with 'paper' (scores.reported_protocol): benchmark it "
        "with a paper suite (benchmark.suite) or set scores.mix_protocols: true"
    )
    assert not (tmp_path / "scores.csv").exists() and not (tmp_path / "protocols.json").exists()
    code, out, err = _cli([*argv, "-S", "scores.mix_protocols=true"], capsys)
    assert code == 0, err
    assert json.loads(out) == {"models": 17, "benchmarks": 6, "measured": 1}
    protocols = json.loads((tmp_path / "protocols.json").read_text())
    assert protocols["tiny"] == shown and protocols["gpt-4"] == "paper" and len(protocols) == 17
    # a paper-protocol row merges without the param; with no reported table nothing to check
    (measured / "tiny.json").write_text(
        json.dumps({"model": "tiny", "ifeval": 0.5, "meta.protocol": "paper"})
    )
    code, _, err = _cli(argv, capsys)
    assert code == 0, err
    assert read_scores(tmp_path / "scores.csv").columns == read_scores(REPORTED).columns


def test_kinship_metrics_record_each_rows_protocol(tmp_path: Path) -> None:
    """The kinship stage reads the scores stage's protocols file: meta.protocol.<model> for
    every row of the table and meta.protocols, the distinct ones."""
    from karma.core.stage import execute
    from karma.kinship.kinship import STAGE as KINSHIP
    from karma.kinship.kinship import KinshipPaths

    protocols = {m: "paper" for m in read_scores(REPORTED)["model"].to_list()}
    protocols["gpt-4"] = "loglik"
    (tmp_path / "protocols.json").write_text(json.dumps(protocols))
    paths = KinshipPaths(
        scores=REPORTED, protocols=tmp_path / "protocols.json", out=tmp_path / "kin"
    )
    metrics = execute(KINSHIP, Params(), paths)
    assert {k: v for k, v in metrics.items() if k.startswith("meta.protocol.")} == {
        f"meta.protocol.{m}": p for m, p in protocols.items()
    }
    assert metrics["meta.protocols"] == "loglik,paper"
    plain = execute(KINSHIP, Params(), KinshipPaths(scores=REPORTED, out=tmp_path / "kin2"))
    assert not any(k.startswith("meta.") for k in plain)


# ---------------------------------------------------------------- paired comparison


def _frame(rows: dict[str, list[float]]) -> pl.DataFrame:
    """A per-item frame (SAMPLE_SCHEMA's key columns) from {benchmark: scores}."""
    data = [
        {"benchmark": b, "item": f"t/{i}", "task": "t", "task_doc_id": i, "score": v}
        for b, scores in rows.items()
        for i, v in enumerate(scores)
    ]
    return pl.DataFrame(data)


def test_compare_runs_keys_by_hand_and_against_karma_stats() -> None:
    from karma.core import stats
    from karma.evaluation.metrics import compare_runs

    base_items = {"ifeval": [1.0] * 16 + [0.0] * 33, "arc_easy": [1.0, 0.0, 1.0, 0.0]}
    policy_items = {"ifeval": [1.0] * 13 + [0.0] * 36, "arc_easy": [1.0, 1.0, 1.0, 1.0]}
    base = {"ifeval.prompt_level_strict_acc": 16 / 49, "meta.suite": "embedded"}
    base |= {f"ifeval.{k}": v for k, v in stats.estimate(base_items["ifeval"]).items()}
    policy = {"ifeval.prompt_level_strict_acc": 13 / 49, "meta.suite": "embedded"}
    policy |= {f"ifeval.{k}": v for k, v in stats.estimate(policy_items["ifeval"]).items()}
    got = compare_runs(base, policy, _frame(base_items), _frame(policy_items), seed=5, n_boot=1000)
    ifeval = stats.paired(policy_items["ifeval"], base_items["ifeval"], seed=5, n_boot=1000)
    # Holm across the comparison's two benchmarks: ifeval p 0.25, arc_easy p 0.5 -> 0.5, 0.5
    assert got["delta.arc_easy.p"] == 0.5 and got["delta.ifeval.p_holm"] == 0.5
    ifeval["p_holm"] = 0.5
    assert {k.removeprefix("delta.ifeval."): v for k, v in got.items()
            if k.startswith("delta.ifeval.") and k != "delta.ifeval.prompt_level_strict_acc"
            } == ifeval  # fmt: skip
    # 3 of 49 prompts lost: the example; the interval holds 0, McNemar p = 0.25
    assert got["delta.ifeval.score"] == round(-3 / 49, 6)
    assert got["delta.ifeval.p"] == pytest.approx(0.25) and got["delta.ifeval.significant"] == 0
    assert got["delta.ifeval.prompt_level_strict_acc"] == round(-3 / 49, 6)
    assert (got["delta.arc_easy.wins"], got["delta.arc_easy.losses"]) == (2, 0)
    assert got["base.ifeval.score"] == round(16 / 49, 6) and "delta.ifeval.stderr" not in got
    assert not any(k.startswith("meta.") for k in got)  # run_evaluate adds the policy's
    # a baseline of other items, or of another suite, is refused
    fewer = _frame({"ifeval": base_items["ifeval"][:40]})
    with pytest.raises(KarmaError, match=r"per-item results of 'ifeval' differ.*40 shared"):
        compare_runs(base, policy, fewer, _frame(policy_items), seed=0, n_boot=100)
    with pytest.raises(KarmaError, match=r"field 'meta.suite': the baseline was evaluated"):
        compare_runs({**base, "meta.suite": "lm_eval"}, policy, _frame(base_items),
                     _frame(policy_items), seed=0, n_boot=100)  # fmt: skip


# ---------------------------------------------------------------- real lm-eval, tiny model


@pytest.fixture(scope="module")
def varied_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two tiny models whose greedy answers are varied text and differ from each other (base,
    policy); the policy directory carries a policy's provenance."""
    from karma.core.lm import write_provenance
    from tests.fixtures import build_tiny_model

    root = tmp_path_factory.mktemp("varied")
    base = build_tiny_model(root / "base", initializer_range=0.3)
    policy = build_tiny_model(root / "policy", initializer_range=0.3, seed=1)
    write_provenance(base, {"source": "tiny/base", "resolved": "tiny", "dtype": "float32"})
    write_provenance(
        policy,
        {"source": "tiny/base", "base": {"source": "tiny/base"}, "method": "dpo", "seed": 3},
    )
    return base, policy


def _refuse_to_compute(monkeypatch: pytest.MonkeyPatch, *, from_load: int) -> list[str]:
    """Patch the model loader: from load number ``from_load`` on, the loaded model raises on
    any inference call, so only lm-eval's response cache can answer. Returns the load log.

    (The model is still loaded on a full cache hit: lm-eval needs its tokenizer and chat
    template to build the requests that it looks up.)
    """
    real = lmeval.load_lm
    loads: list[str] = []

    def refuse(requests: list, *args: Any, **kwargs: Any) -> list:
        raise AssertionError(f"cache miss: the model was asked {len(requests)} requests")

    def load(model: str, cfg: Any, **kwargs: Any) -> Any:
        lm = real(model, cfg, **kwargs)
        loads.append(model)
        if len(loads) >= from_load:
            for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
                setattr(lm, name, refuse)
        return lm

    monkeypatch.setattr(lmeval, "load_lm", load)
    return loads


def test_response_cache_answers_without_running_the_model(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    cfg = EvaluateConfig(limit=2, tasks=TWO)
    loads = _refuse_to_compute(monkeypatch, from_load=2)
    first = evaluate_model(str(tiny_model_dir), cfg)
    metrics = [
        "arc_easy.acc",
        "arc_easy.acc_norm",
        "ifeval.inst_level_loose_acc",
        "ifeval.inst_level_strict_acc",
        "ifeval.prompt_level_loose_acc",
        "ifeval.prompt_level_strict_acc",
    ]
    assert set(first) == {
        *metrics,
        *(f"{m}_{k}" for m in metrics for k in ("stderr", "ci_low", "ci_high")),
        *(f"{b}.{k}" for b in TWO for k in HEADLINE),
    }
    # the headline metric's interval keys are its score's
    assert first["arc_easy.acc_norm_ci_low"] == first["arc_easy.ci_low"]
    assert first["ifeval.prompt_level_strict_acc_stderr"] == first["ifeval.stderr"]
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


def test_evaluate_cli_eval_json_against_a_baseline(
    varied_models: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``karma evaluate --out DIR`` keeps metrics.json and samples.parquet; with
    ``--baseline`` the flat eval.json of NOTES-wave2 interface 4: every lm-eval metric of
    base and policy, each benchmark's score / ci_low / ci_high / stderr / n, the paired delta
    (score, ci_low, ci_high, p, significant) recomputed here from the two samples files, and
    the meta keys from the settings and the model directories' provenance."""
    from karma.core import stats

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    base_model, policy_model = varied_models
    opts = ["--limit", "4", "--max-gen-toks", "16", "--n-boot", "500", "--bootstrap-seed", "7"]
    code, out, err = _cli(
        ["evaluate", "--model", str(base_model), "--out", str(tmp_path / "base"), *opts], capsys
    )
    assert code == 0, err
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    assert json.loads(out) == base
    assert base["meta.base_model"] == "tiny/base" and "meta.seed" not in base
    argv = ["evaluate", "--model", str(policy_model), "--baseline", str(tmp_path / "base")]
    argv += ["--out", str(tmp_path / "policy"), "--metrics", str(tmp_path / "eval.json"), *opts]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    got = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(out) == got
    policy = json.loads((tmp_path / "policy" / "metrics.json").read_text())
    samples = {
        who: pl.read_parquet(tmp_path / who / "samples.parquet") for who in ("base", "policy")
    }
    assert samples["base"].columns == list(lmeval.SAMPLE_SCHEMA)
    assert {
        "meta.suite": "embedded",
        "meta.protocol": "loglik",
        "meta.base_model": "tiny/base",
        "meta.seed": 3,
        "meta.train_method": "dpo",
        **{f"meta.items.{b}": 4 for b in BENCHMARKS},
    } == {k: v for k, v in got.items() if k.startswith("meta.")}
    differ = 0
    for bench, spec in EMBEDDED.items():
        for who, own in (("base", base), ("policy", policy)):
            frame = samples[who].filter(pl.col("benchmark") == bench)
            assert frame.height == 4 and frame["task_doc_id"].to_list() == [0, 1, 2, 3]
            est = stats.estimate(frame["score"].to_numpy())
            assert {k: got[f"{who}.{bench}.{k}"] for k in HEADLINE} == est
            assert got[f"{who}.{bench}.{spec.flat_metric}"] == pytest.approx(est["score"])
            assert got[f"{who}.{bench}.ci_low"] <= est["score"] <= got[f"{who}.{bench}.ci_high"]
            assert {k.removeprefix(f"{bench}."): v for k, v in own.items()
                    if k.startswith(f"{bench}.")} == {
                k.removeprefix(f"{who}.{bench}."): v for k, v in got.items()
                if k.startswith(f"{who}.{bench}.")} | {
                spec.flat_metric: pytest.approx(est["score"])}  # fmt: skip
        pair = stats.paired(
            samples["policy"].filter(pl.col("benchmark") == bench)["score"].to_numpy(),
            samples["base"].filter(pl.col("benchmark") == bench)["score"].to_numpy(),
            seed=7,
            n_boot=500,
        )
        assert {k: got[f"delta.{bench}.{k}"] for k in pair} == pair
        assert got[f"delta.{bench}.score"] == pytest.approx(
            got[f"policy.{bench}.score"] - got[f"base.{bench}.score"], abs=1e-6
        )
        assert got[f"delta.{bench}.significant"] in (0, 1)
        differ += (
            samples["policy"].filter(pl.col("benchmark") == bench)["response"].to_list()
            != samples["base"].filter(pl.col("benchmark") == bench)["response"].to_list()
        )
    assert differ >= 1  # the two models answer differently: a real comparison
    # the generated text and, for generation tasks with a filter, what it extracted
    ifeval = samples["policy"].filter(pl.col("benchmark") == "ifeval")
    assert ifeval["response"].null_count() == 0 and ifeval["extracted"].null_count() == 4
    assert samples["policy"].filter(pl.col("benchmark") == "arc_easy")["response"].null_count()


def test_benchmark_cli_writes_one_row(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The row holds each benchmark's suite metric (the paper-protocol mini suite by default):
    the same numbers ``evaluate`` reports with that suite; ``--samples`` keeps the items."""
    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    out_file = tmp_path / "measured" / "x.json"
    argv = ["benchmark", "--model", str(tiny_model_dir), "--name", "x", "--out", str(out_file)]
    argv += ["--samples", str(tmp_path / "samples" / "x.parquet")]
    code, out, err = _cli([*argv, "--limit", "2", "--max-gen-toks", "8"], capsys)
    assert code == 0, err
    row = json.loads(out_file.read_text())
    assert json.loads(out) == row
    meta = {"meta.protocol": "paper", "meta.suite": "embedded_paper"}
    meta |= {f"meta.items.{b}": 2 for b in BENCHMARKS}
    assert set(row) == {"model", *BENCHMARKS, *meta} and row["model"] == "x"
    assert {k: row[k] for k in meta} == meta
    assert read_measured(out_file) == row
    items = pl.read_parquet(tmp_path / "samples" / "x.parquet")
    assert items.height == 12 and set(items["benchmark"]) == set(BENCHMARKS)
    # the evaluate settings with the same suite, limit and generation cap: from the cache
    _refuse_to_compute(monkeypatch, from_load=1)
    cfg = EvaluateConfig(suite="embedded_paper", limit=2, max_gen_toks=8)
    metrics = evaluate_model(str(tiny_model_dir), cfg)
    assert {b: metrics[f"{b}.{s.flat_metric}"] for b, s in PAPER_MINI.items()} == {
        b: row[b] for b in BENCHMARKS
    }


def test_vllm_backend_is_refused_without_vllm_and_passes_its_args(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """vllm is not installed here: one line. Where it is, lm-eval's vllm model gets
    pretrained, dtype, batch_size and every model_args key."""
    import importlib.util

    argv = ["evaluate", "--model", str(tiny_model_dir), "--backend", "vllm", "--no-cache"]
    if importlib.util.find_spec("vllm") is None:
        code, out, err = _cli(argv, capsys)
        assert code == 1 and out == ""
        assert "error: --backend: backend vllm needs the vllm package" in _one_error_line(err)
    seen: dict[str, Any] = {}

    def fake_vllm(**kwargs: Any) -> Any:
        seen.update(kwargs)
        raise KarmaError("stop here")

    import lm_eval.api.registry as registry

    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: n == "vllm" or real_spec(n))
    monkeypatch.setattr(registry, "get_model", lambda name: {"vllm": fake_vllm}[name])
    cfg = EvaluateConfig(
        backend="vllm",
        dtype="bfloat16",
        model_args={"tensor_parallel_size": 2, "gpu_memory_utilization": 0.8},
    )
    with pytest.raises(KarmaError, match="stop here"):
        lmeval.load_lm(str(tiny_model_dir), cfg)
    assert seen == {
        "pretrained": str(tiny_model_dir),
        "dtype": "bfloat16",
        "batch_size": 8,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
    }


def _ifeval_task(directory: Path) -> Path:
    """The embedded IFEval task on 6 of its items plus 4 whose checks draw from the random
    state (letter frequency without a usable letter, as google/IFEval's item 1122)."""
    rows = [json.loads(line) for line in (TASKS_DIR / "ifeval.jsonl").read_text().splitlines()]
    drawn = [
        {"key": 9000 + i, "prompt": f"Write a note number {i} with at least 4 '#'.",
         "instruction_id_list": ["keywords:letter_frequency"],
         "kwargs": [{"letter": "#"} if i % 2 else {}]}
        for i in range(4)
    ]  # fmt: skip
    directory.mkdir(parents=True)
    (directory / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6] + drawn))
    text = (TASKS_DIR / "karma_ifeval.yaml").read_text()
    text = text.replace("task: karma_ifeval", "task: drawn_ifeval")
    (directory / "drawn_ifeval.yaml").write_text(text.replace("ifeval.jsonl", "items.jsonl"))
    return directory / "drawn_ifeval.yaml"


@pytest.mark.slow
def test_ifeval_scores_equal_lm_evals_command_line(
    varied_models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``lm_eval run`` (a fresh process, its default seeds) on karma's IFEval task scores every
    item as karma does, the items whose checks draw from the random state included; karma's
    scores do not depend on lm-eval's random seed (per-item seeding), so they are the same in
    any process, order and process count."""
    import nltk

    from karma.evaluation.taskconfig import ensure_punkt

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    model = varied_models[0]
    task = _ifeval_task(tmp_path / "task")
    ensure_punkt()
    env = {**os.environ, "NLTK_DATA": os.pathsep.join(nltk.data.path)}
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={model},dtype=float32", "--tasks", "drawn_ifeval", "--include_path",
           ".", "--apply_chat_template", "--batch_size", "8", "--device", "cpu", "--gen_kwargs",
           "max_gen_toks=24", "--output_path", str(tmp_path / "cli"), "--log_samples"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=task.parent, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = (tmp_path / "cli").rglob("results_*.json")
    (samples_file,) = (tmp_path / "cli").rglob("samples_drawn_ifeval_*.jsonl")
    cli = json.loads(results_file.read_text())["results"]["drawn_ifeval"]
    cli_items = sorted(
        (json.loads(line) for line in samples_file.read_text().splitlines()),
        key=lambda r: r["doc_id"],
    )
    spec = {"ifeval": TaskSpec(task=str(task), metric="prompt_level_strict_acc")}
    cfg = EvaluateConfig(
        max_gen_toks=24, cache=False, samples_dir=str(tmp_path / "ours"), allow_code=True
    )  # the task file's !function: lm-eval's own IFEval
    ours = lmeval.run_tasks(str(model), spec, cfg)
    for key in ("prompt_level_strict_acc", "prompt_level_loose_acc", "inst_level_strict_acc",
                "inst_level_loose_acc"):  # fmt: skip
        assert ours.metrics["ifeval"][key] == cli[f"{key},none"], key
    mine = [json.loads(line) for line in (tmp_path / "ours" / "drawn_ifeval.jsonl").open()]
    fields = ("resps", "prompt_level_strict_acc", "prompt_level_loose_acc",
              "inst_level_strict_acc", "inst_level_loose_acc")  # fmt: skip
    assert [[r[f] for f in fields] for r in mine] == [[r[f] for f in fields] for r in cli_items]
    assert ours.samples["score"].to_list() == [float(r["prompt_level_strict_acc"]) for r in mine]
    assert len({r["resps"][0][0] for r in mine}) > 1  # varied answers, not one repeated text
    # lm-eval's random seed does not reach the per-item seeded checks
    monkeypatch.setitem(lmeval.LM_EVAL_SEEDS, "random_seed", 12345)
    again = lmeval.run_tasks(str(model), spec, cfg.model_copy(update={"samples_dir": None}))
    assert again.samples.equals(ours.samples)


@pytest.mark.slow
def test_two_processes_give_the_metrics_of_one(
    varied_models: tuple[Path, Path], tmp_path: Path
) -> None:
    """``karma evaluate --num-processes 2`` re-runs itself under ``python -m
    torch.distributed.run`` (2 CPU processes, gloo): lm-eval splits the items between them
    and gathers on rank 0, which alone writes. Metrics and per-item results are identical to
    one process (5 items per task: an uneven split)."""
    base = varied_models[0]
    env = {**os.environ, "KARMA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    karma = [sys.executable, "-m", "karma.cli"]

    def run(n: int, name: str) -> tuple[dict, pl.DataFrame]:
        argv = [*karma, "evaluate", "--model", str(base), "--out", str(tmp_path / name),
                "--limit", "5", "--max-gen-toks", "12", "--no-cache", "--num-processes", str(n),
                "--tasks", json.dumps({b: s.model_dump() for b, s in TWO.items()})]  # fmt: skip
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        if n > 1:
            assert "torch.distributed.run" in proc.stderr  # launched, not run in-process
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        return metrics, pl.read_parquet(tmp_path / name / "samples.parquet")

    one, one_items = run(1, "one")
    two, two_items = run(2, "two")
    assert two == one
    assert two_items.equals(one_items) and one_items.height == 10
    assert sorted(p.name for p in tmp_path.iterdir() if "karma-tmp" in p.name) == []


@pytest.mark.slow
def test_seed_replicates_queue_as_a_dvc_grid(tmp_path: Path) -> None:
    """``dvc exp run --queue -S seed=0,1,2`` (DVC's Hydra sweep syntax) queues one experiment
    per seed; run, each records its seed as meta.seed, as eval.json does (a scratch project
    whose stage writes the seed it was given)."""
    dvc = [sys.executable, "-m", "dvc"]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def sh(*args: str) -> str:
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@example.com")
    sh("git", "config", "user.name", "t")
    sh(*dvc, "init", "-q")
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    (tmp_path / "run.py").write_text(
        "import json, yaml\n"
        "seed = yaml.safe_load(open('params.yaml'))['seed']\n"
        "json.dump({'meta.seed': seed, 'delta.x.score': seed / 10}, open('eval.json', 'w'))\n"
    )
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  run:\n    cmd: python run.py\n    deps: [run.py]\n    params: [seed]\n"
        "    metrics:\n      - eval.json:\n          cache: false\n"
    )
    sh(*dvc, "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh(*dvc, "exp", "run", "--queue", "-S", "seed=0,1,2")
    assert sh(*dvc, "queue", "status").count("Queued") == 3
    sh(*dvc, "exp", "run", "--run-all", "-j", "1")
    shown = json.loads(sh(*dvc, "exp", "show", "--json"))
    runs = [r["data"] for c in shown for e in c.get("experiments") or [] for r in e["revs"]]
    seeds = sorted(r["params"]["params.yaml"]["data"]["seed"] for r in runs)
    assert seeds == [0, 1, 2]
    assert sorted(r["metrics"]["eval.json"]["data"]["meta.seed"] for r in runs) == seeds


@pytest.mark.slow
def test_benchmark_tiny_model_feeds_scores_and_kinship(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real lm-eval on every paper-protocol mini task (4 items each, per-sample logs), the
    scores stage merging the row into the paper table, then the kinship engine on it."""
    from karma.core.stage import execute
    from karma.kinship.kinship import compute_kinship
    from karma.kinship.scores import STAGE as SCORES_STAGE
    from karma.kinship.scores import ScoresPaths

    monkeypatch.setenv("KARMA_CACHE_DIR", str(tmp_path / "cache"))
    samples = tmp_path / "samples"
    cfg = BenchmarkConfig(limit=4, max_gen_toks=8, samples_dir=str(samples))
    row = benchmark_model(str(tiny_model_dir), cfg, name="tiny")
    assert list(row)[: len(BENCHMARKS) + 1] == ["model", *BENCHMARKS] and row["model"] == "tiny"
    assert all(0.0 <= row[b] <= 1.0 for b in BENCHMARKS)
    # 4 items: every score is a multiple of 1/4
    assert all((row[b] * 4).is_integer() for b in BENCHMARKS)
    logs = {p.name: p.read_text().splitlines() for p in samples.iterdir()}
    assert sorted(logs) == sorted(f"{s.task}.jsonl" for s in PAPER_MINI.values())
    # one logged sample per item and filter (the paper tasks have three: custom-extract,
    # strict-extract, flexible-extract; IFEval one)
    assert all(len(lines) in (4, 12) for lines in logs.values())
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
    ecfg = EvaluateConfig(suite="embedded_paper", limit=4, max_gen_toks=8)
    metrics = evaluate_model(str(tiny_model_dir), ecfg)
    assert {b: metrics[f"{b}.{s.flat_metric}"] for b, s in PAPER_MINI.items()} == {
        b: row[b] for b in BENCHMARKS
    }
    assert {"ifeval.prompt_level_strict_acc", "mmlu_pro.exact_match_flexible-extract"} <= set(
        metrics
    )
    assert all("," not in k for k in metrics)


def test_fast_task_index_equals_lm_eval_registry(tmp_path: Path) -> None:
    """The line scan lists exactly lm-eval's own registry names (tasks, groups, tags, Python
    tasks, names inherited through ``include``), so an unknown name fails in about a second."""
    from lm_eval.tasks import TaskManager

    from karma.evaluation.taskindex import names_in, registry_names

    assert registry_names() == frozenset(TaskManager().all_tasks)
    # the shapes the scan must read: quoted keys, block tag lists, an included tag, a group
    (tmp_path / "base_yaml").write_text('"tag":\n- "fam"\n- other\n')
    (tmp_path / "a.yaml").write_text('"include": base_yaml\n"task": "t_a"  # note\n')
    (tmp_path / "g.yaml").write_text("group: grp\ntag: [nope]\ntask:\n  - t_a\n")
    (tmp_path / "p.yaml").write_text("group: pyfam\ntask: t_py\nclass: !function task.T\n")
    assert names_in(tmp_path) == {"t_a", "fam", "other", "grp", "t_py"}
