"""The paper protocol's tasks (karma/evaluation/tasks/paper, and paper/hub for the full data sets):
prompts, extraction, scoring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from karma.evaluation.lmeval import run_tasks
from karma.evaluation.settings import RunConfig, TaskSpec
from karma.evaluation.taskconfig import load_task_config

PAPER = Path(__file__).resolve().parents[1] / "karma" / "evaluation" / "tasks" / "paper"
EMBEDDED = PAPER.parent / "embedded"
METRIC = "exact_match,custom-extract"
MMLU_PRO_INSTRUCTION = (
    'Think step by step and then finish your answer with "the answer is (X)" '
    "where X is the correct letter choice."
)


def _letter(name: str, row: dict) -> str:
    """The correct letter, read from the raw item (independently of the YAML templates)."""
    if name in ("arc_easy", "arc_challenge"):
        return "ABCD"[row["choices"]["label"].index(row["answerKey"])]
    if name == "mmlu_stem":
        return "ABCD"[row["answer"]]
    if name == "hellaswag":
        return "ABCD"[int(row["label"])]
    return row["answer"]


def _options(name: str, row: dict) -> list[str]:
    return {
        "arc_easy": lambda: row["choices"]["text"],
        "arc_challenge": lambda: row["choices"]["text"],
        "mmlu_stem": lambda: row["choices"],
        "hellaswag": lambda: row["endings"],
        "mmlu_pro": lambda: row["options"],
    }[name]()


NAMES = ["arc_easy", "arc_challenge", "mmlu_stem", "hellaswag", "mmlu_pro"]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (EMBEDDED / f"{name}.jsonl").read_text().splitlines()]


def _task(name: str):
    from lm_eval.tasks import TaskManager

    cfg = load_task_config(PAPER / f"karma_paper_{name}.yaml")
    return next(iter(TaskManager(include_defaults=False).load_task_or_group([cfg]).values()))


def _mmlu_pro_template() -> dict:
    import lm_eval

    from karma.evaluation.taskconfig import TagLoader

    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu_pro" / "_default_template_yaml"
    return yaml.load(path.read_text(), Loader=TagLoader)


def test_the_paper_dir_holds_exactly_the_five_tasks() -> None:
    assert sorted(p.stem for p in PAPER.glob("*.yaml")) == [
        f"karma_paper_{n}" for n in sorted(NAMES)
    ]


@pytest.mark.parametrize("name", NAMES)
def test_prompts_targets_and_settings(name: str) -> None:
    cfg = load_task_config(PAPER / f"karma_paper_{name}.yaml")
    assert cfg["output_type"] == "generate_until"
    assert cfg["dataset_kwargs"]["data_files"]["test"] == str(
        (EMBEDDED / f"{name}.jsonl").resolve()
    )
    ref = _mmlu_pro_template()  # lm-eval's own mmlu_pro: its filter (our diagnostic), stop, metric
    (strict,) = ref["filter_list"]
    assert cfg["filter_list"][1] == {**strict, "name": "strict-extract"}
    from karma.evaluation.extract import mmlu_pro_fallback

    assert cfg["filter_list"][0]["filter"][0]["filter_fn"] is mmlu_pro_fallback
    names = [f["name"] for f in cfg["filter_list"]]
    assert names == ["custom-extract", "strict-extract", "flexible-extract"]
    assert cfg["metric_list"] == ref["metric_list"]
    assert cfg["generation_kwargs"]["until"] == ref["generation_kwargs"]["until"]
    assert cfg["generation_kwargs"]["max_gen_toks"] >= 256

    task = _task(name)
    docs, rows = list(task.test_docs()), _rows(name)
    assert len(docs) == len(rows) >= 40
    for doc, row in zip(docs, rows, strict=True):
        prompt = task.fewshot_context(doc, 0)
        assert task.doc_to_target(doc) == _letter(name, row)
        assert prompt.startswith("The following are multiple choice questions (with answers) about")
        assert MMLU_PRO_INSTRUCTION + "\nQuestion:\n" in prompt
        assert prompt.endswith("\nAnswer: Let's think step by step.")
        listed = "".join(
            f"{'ABCDEFGHIJ'[i]}. {o.strip()}\n" for i, o in enumerate(_options(name, row))
        )
        assert "\nOptions:\n" + listed + "Answer:" in prompt


def test_mmlu_pro_prompt_is_lm_evals_own() -> None:
    from lm_eval.tasks.mmlu_pro.utils import doc_to_text

    task = _task("mmlu_pro")
    for doc in task.test_docs():
        assert task.doc_to_text(doc) == doc_to_text(doc)


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("blah. The answer is (B).", "B"),
        ("Step 1 ... so the answer is C", "C"),
        ("the answer is (J)", "J"),
        ("The answer is (A). Or the answer is (D).", "A"),  # first match, as lm-eval's mmlu_pro
        ("The answer: B", "[invalid]"),  # lm-eval's pattern is that strict
        ("I think B.", "[invalid]"),
    ],
)
def test_strict_extract_filter(response: str, letter: str) -> None:
    """lm-eval's mmlu_pro pattern alone: kept as a diagnostic (``strict-extract``)."""
    assert _extract(response, 1) == letter


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("blah. The answer is (B).", "B"),
        ("The answer is (A). Or the answer is (D).", "A"),  # the first 'answer is' wins
        ("Reasoning...\nAnswer: B", "B"),  # MMLU-Pro's scripts' first fallback
        ("I think B is right, not C", "C"),  # then the last standalone letter, as they do
        ("no letter here", "[invalid]"),
    ],
)
def test_custom_extract_is_mmlu_pros_extraction_with_fallbacks(response: str, letter: str) -> None:
    """The score (``custom-extract``): MMLU-Pro's scripts' three steps."""
    assert _extract(response, 0) == letter


def _extract(response: str, which: int) -> str:
    from lm_eval.api.registry import get_filter

    task = _task("arc_easy")
    steps = task.config.filter_list[which]["filter"]
    resps: list = [[response]]
    for step in steps:
        kwargs = {k: v for k, v in step.items() if k != "function"}
        resps = list(get_filter(step["function"])(**kwargs).apply(resps, [{}]))
    return resps[0]


@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("blah. The answer is (B).", "B"),
        ("Step 1 ... so the answer is C", "C"),
        ("D. water starts to bubble", "D"),  # the option restated: strict finds nothing
        ("I pick (C)", "C"),
        ("A man sees B: then the answer: C.", "C"),  # the last standalone letter
        ("Answer: B", "B"),
        ("A cat sat on a mat", "[invalid]"),  # "A" as a word is no answer
        ("ABC.", "[invalid]"),
    ],
)
def test_flexible_extract_filter(response: str, letter: str) -> None:
    """The lenient third filter (a diagnostic: format failures vs wrong answers)."""
    assert _extract(response, 2) == letter


HUB = PAPER / "hub"


def _hub_hellaswag(doc: dict) -> dict:
    """What lm-eval's hellaswag process_docs makes of a hub row with this context."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return {
        "query": preprocess(doc["activity_label"] + ": " + doc["ctx"]),
        "choices": [preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def _render(cfg: dict, data: dict, doc: dict) -> tuple[str, str]:
    """Prompt and target of ``doc`` by the task ``cfg`` (its data swapped for ``data``)."""
    from lm_eval.tasks import TaskManager

    cfg = {k: v for k, v in cfg.items() if k not in ("process_docs", "validation_split")}
    cfg.update(dataset_path="json", dataset_name=None, test_split="test", dataset_kwargs=data)
    if cfg["task"].endswith("hellaswag"):
        cfg["process_docs"] = lambda ds: ds.map(_hub_hellaswag)
    task = next(iter(TaskManager(include_defaults=False).load_task_or_group([cfg]).values()))
    return task.fewshot_context(doc, 0), task.doc_to_target(doc)


HUB_DATA = {
    "arc_easy": "allenai/ai2_arc",
    "arc_challenge": "allenai/ai2_arc",
    "hellaswag": "Rowan/hellaswag",
    "mmlu_stem": "cais/mmlu",
    "mmlu_pro": "TIGER-Lab/MMLU-Pro",
}


@pytest.mark.parametrize(("name", "mini"), [(n, n) for n in HUB_DATA])
def test_hub_tasks_render_the_mini_tasks_prompts(name: str, mini: str) -> None:
    """The full-data tasks of the paper suite ask exactly what the mini tasks ask: the same
    prompt and target for the same item (HellaSwag through lm-eval's process_docs fields;
    MMLU-STEM without its subject filter, the mini items' subjects being partly not MMLU's)."""
    hub = load_task_config(HUB / f"karma_paper_hub_{name}.yaml")
    assert hub["dataset_path"] == HUB_DATA[name]
    base = load_task_config(PAPER / f"karma_paper_{mini}.yaml")
    keep = ("filter_list", "metric_list", "description", "output_type", "num_fewshot")
    assert {k: hub[k] for k in keep} == {k: base[k] for k in keep}
    gen, mini_gen = dict(hub["generation_kwargs"]), dict(base["generation_kwargs"])
    length = 2048 if name == "mmlu_pro" else 1024  # MMLU-Pro: lm-eval's and its scripts' length
    assert gen.pop("max_gen_toks") == length and mini_gen.pop("max_gen_toks") == 256
    assert gen == mini_gen  # a larger model's chain of thought has 4x the room
    task = _task(mini)
    for doc in list(task.test_docs())[:5]:
        hub_doc = _hub_hellaswag(doc) if name == "hellaswag" else doc
        assert _render(hub, base["dataset_kwargs"], hub_doc) == (
            task.fewshot_context(doc, 0),
            task.doc_to_target(doc),
        )


def _scripted_lm(name: str, fixed: str | None = None):
    """An lm-eval LM that answers from the item: the correct letter, or always ``fixed``."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return [
                f"Let's see. Thinking... the answer is ({fixed or _letter(name, r.doc)})."
                for r in requests
            ]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Scripted()


@pytest.mark.parametrize("name", NAMES)
def test_scoring_end_to_end_with_scripted_responses(name: str) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    cfg = load_task_config(PAPER / f"karma_paper_{name}.yaml")
    share_a = sum(_letter(name, r) == "A" for r in _rows(name)) / len(_rows(name))
    for fixed, expected in ((None, 1.0), ("A", share_a)):
        res = lm_eval.simple_evaluate(
            model=_scripted_lm(name, fixed),
            tasks=[cfg],
            task_manager=TaskManager(include_defaults=False),
            bootstrap_iters=0,
        )
        assert res["results"][f"karma_paper_{name}"][METRIC] == pytest.approx(expected)


def test_tiny_model_runs_every_task_through_run_tasks(tiny_model_dir: Path) -> None:
    """Real lm-eval generation (2 items each, chat template) via
    karma.evaluation.evaluate.run_tasks."""
    specs = {n: TaskSpec(task=str(PAPER / f"karma_paper_{n}.yaml"), metric=METRIC) for n in NAMES}
    cfg = RunConfig(limit=2, max_gen_toks=8, batch_size=2, cache=False, threads=1)
    out = run_tasks(str(tiny_model_dir), specs, cfg)
    assert set(out.metrics) == set(NAMES)
    for name in NAMES:
        assert out.metrics[name]["exact_match_custom-extract"] in (0.0, 0.5, 1.0)
        assert out.metrics[name]["score"] == out.metrics[name]["exact_match_custom-extract"]
        rows = out.samples.filter(out.samples["benchmark"] == name)
        assert rows["task_doc_id"].to_list() == [0, 1] and rows["response"].null_count() == 0


def _lm_eval_yaml(rel: str) -> dict:
    import lm_eval

    from karma.evaluation.taskconfig import TagLoader

    path = Path(lm_eval.__file__).parent / "tasks" / rel
    return yaml.load(path.read_text(), Loader=TagLoader)


def _lm_eval_mmlu() -> dict[str, str]:
    """Every MMLU subject of the installed lm-eval (lm_eval/tasks/mmlu/default) -> its tag."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    cfgs = [_lm_eval_yaml(f"mmlu/default/{p.name}") for p in sorted(root.glob("mmlu_*.yaml"))]
    return {str(c["dataset_name"]): str(c["tag"]) for c in cfgs}


def test_hub_mmlu_stem_items_are_lm_evals_mmlu_stem_groups() -> None:
    """karma's subject list is lm-eval's mmlu_stem group's (read from the installed package),
    and the task's filter keeps exactly those subjects' rows of MMLU's `all` configuration."""
    from datasets import Dataset

    from karma.evaluation.mmlu import MMLU_STEM_SUBJECTS, mmlu_stem_docs

    group = _lm_eval_yaml("mmlu/default/_mmlu_stem.yaml")
    assert group["group"] == "mmlu_stem" and group["task"] == ["mmlu_stem_tasks"]
    subjects = _lm_eval_mmlu()
    assert len(subjects) == 57
    stem = sorted(s for s, tag in subjects.items() if tag == "mmlu_stem_tasks")
    assert list(MMLU_STEM_SUBJECTS) == stem
    template = _lm_eval_yaml("mmlu/default/_default_template_yaml")
    hub = load_task_config(HUB / "karma_paper_hub_mmlu_stem.yaml")
    assert (hub["dataset_path"], hub["test_split"]) == (template["dataset_path"], "test")
    assert template["test_split"] == "test" and hub["dataset_name"] == "all"
    assert hub["process_docs"] is mmlu_stem_docs
    # a stand-in for `all`: two rows per subject, in lm-eval's order
    rows = [{"subject": s, "question": f"{s} {i}"} for s in sorted(subjects) for i in range(2)]
    kept = mmlu_stem_docs(Dataset.from_list(rows))
    assert kept["question"] == [r["question"] for r in rows if r["subject"] in stem]
    assert len(kept) == 2 * 19


def test_hub_mmlu_pro_is_lm_evals_mmlu_pro_scored_with_fallbacks() -> None:
    """lm-eval's mmlu_pro: its data, prompt (doc_to_text), per-category description, stop
    sequence, metric and length; zero-shot; its strict pattern kept as strict-extract, the score
    MMLU-Pro's scripts' extraction. One task over all 14 categories (its group's items)."""
    from lm_eval.tasks.mmlu_pro import utils

    from karma.evaluation.extract import mmlu_pro_fallback

    hub = load_task_config(HUB / "karma_paper_hub_mmlu_pro.yaml")
    ref = _mmlu_pro_template()
    for key in ("dataset_path", "test_split", "metric_list", "doc_to_target"):
        assert hub[key] == ref[key], key
    assert hub["generation_kwargs"] == ref["generation_kwargs"]  # incl. 2048 tokens
    assert hub["doc_to_text"] is utils.doc_to_text and "process_docs" not in hub
    assert (ref["num_fewshot"], hub["num_fewshot"]) == (5, 0)  # zero-shot in the paper suite
    (strict,) = ref["filter_list"]
    assert hub["filter_list"][1] == {**strict, "name": "strict-extract"}
    assert hub["filter_list"][0]["filter"][0]["filter_fn"] is mmlu_pro_fallback
    group = _lm_eval_yaml("mmlu_pro/_mmlu_pro.yaml")
    assert len(group["task"]) == 14
    from lm_eval.utils import apply_template  # how lm-eval renders a description

    for name in group["task"]:
        sub = _lm_eval_yaml(f"mmlu_pro/{name}.yaml")
        category = getattr(utils, sub["process_docs"].split(".")[-1]).keywords["subject"]
        assert apply_template(hub["description"], {"category": category}) == sub["description"]


HUB_STEM_PRO = ["mmlu_stem", "mmlu_pro"]


def _apply(steps: list[dict], response: str) -> str:
    from lm_eval.api.registry import get_filter

    resps: list = [[response]]
    for step in steps:
        kwargs = {k: v for k, v in step.items() if k != "function"}
        resps = list(get_filter(step["function"])(**kwargs).apply(resps, [{}]))
    return resps[0]


@pytest.mark.parametrize("name", HUB_STEM_PRO)
@pytest.mark.parametrize(
    ("response", "letter"),
    [
        ("Both look plausible.\nAnswer: C", "C"),  # MMLU-Pro's first fallback
        ("Step 1: 2 + 2 = 4.\nAnswer:D", "D"),
        ("Option B is wrong, so I'd go with F.", "F"),  # the last standalone letter
        ("Therefore (H) is right", "H"),
    ],
)
def test_hub_strict_fails_where_the_fallback_finds_the_letter(
    name: str, response: str, letter: str
) -> None:
    """Completions without "the answer is (X)": lm-eval's strict pattern (the diagnostic
    strict-extract) finds nothing, the score's extraction (custom-extract) finds the letter."""
    cfg = load_task_config(HUB / f"karma_paper_hub_{name}.yaml")
    custom, strict = (cfg["filter_list"][i]["filter"] for i in (0, 1))
    assert _apply(strict, response) == "[invalid]"
    assert _apply(custom, response) == letter
    stated = f"So the answer is ({letter})."
    assert _apply(custom, stated) == letter == _apply(strict, stated)


def _fallback_lm(name: str, fixed: str):
    """An lm-eval LM that writes "Answer: X" (no "the answer is"): the correct letter on even
    doc ids, ``fixed`` on odd ones."""
    from lm_eval.api.model import LM

    class Fallback(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return [
                f"Reasoning...\nAnswer: {_letter(name, r.doc) if r.doc_id % 2 == 0 else fixed}"
                for r in requests
            ]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError

    return Fallback()


@pytest.mark.parametrize("name", HUB_STEM_PRO)
def test_hub_task_scores_by_the_fallback_under_one_key(name: str) -> None:
    """The hub task (its data swapped for the mini items) is one task with one score key:
    custom-extract counts the "Answer: X" letters, strict-extract none of them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    base = load_task_config(PAPER / f"karma_paper_{name}.yaml")
    cfg = {k: v for k, v in load_task_config(HUB / f"karma_paper_hub_{name}.yaml").items()}
    cfg.pop("process_docs", None)  # the mini items' subjects are partly not MMLU's
    cfg.update(dataset_path="json", dataset_name=None, dataset_kwargs=base["dataset_kwargs"])
    rows = _rows(name)
    expected = sum(
        _letter(name, r) == (_letter(name, r) if i % 2 == 0 else "A") for i, r in enumerate(rows)
    ) / len(rows)
    res = lm_eval.simple_evaluate(
        model=_fallback_lm(name, "A"),
        tasks=[cfg],
        task_manager=TaskManager(include_defaults=False),
        bootstrap_iters=0,
    )
    (task,) = res["results"]
    assert task == f"karma_paper_hub_{name}"
    assert 0.5 < expected < 1.0
    assert res["results"][task][METRIC] == pytest.approx(expected)
    assert res["results"][task]["exact_match,strict-extract"] == 0.0
