"""Generate the embedded demo set ``data/demo/ultrafeedback_demo.jsonl`` (UltraFeedback schema).

Deterministic: ``python data/demo/make_demo.py`` rewrites a byte-identical file.

Each instruction is *verifiable* (IFEval-style format / length / keyword constraints, simple
arithmetic, STEM multiple choice, capitals, short science and commonsense answers). Each has
four completions from four distinct models sampled from the 16 origin models of
``data/origin/scores.csv`` plus ``ultralm-65b`` (absent from the table, as in the paper). A
"good" response satisfies the constraint / is correct, a "bad" one violates it; the chance of a
good response follows the model's S_pref (hard-coded below, computed from the score table when
this was written) plus noise. ``overall_score`` (1-10), ``fine-grained_score`` (1-5) and
``annotations`` ratings imitate a noisy AI judge; a few ratings are strings or "N/A" and a
few responses are empty, as in the real data.

License: Apache-2.0, the project's (every text is generated here; only the model names come from
UltraFeedback). Dataset cards made from this set say so (``karma.pairing.fetch.DEMO_LICENSE``).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from demo_facts import CAPITALS, COMMON_MISTAKES, MC_FACTS, SCIENCE_QA, TOPICS

SEED = 20250226
N_INSTRUCTIONS = 480
OUT = Path(__file__).with_name("ultrafeedback_demo.jsonl")

# S_pref = mean of min-max normalised benchmark scores (data/origin/scores.csv).
S_PREF = {
    "gpt-4": 0.990,
    "bard": 0.856,
    "gpt-3.5-turbo": 0.770,
    "wizardlm-70b": 0.577,
    "llama-2-70b-chat": 0.576,
    "vicuna-33b": 0.573,
    "falcon-40b-instruct": 0.468,
    "wizardlm-13b": 0.451,
    "llama-2-13b-chat": 0.449,
    "llama-2-7b-chat": 0.406,
    "ultralm-13b": 0.395,
    "mpt-30b-chat": 0.375,
    "wizardlm-7b": 0.340,
    "alpaca-7b": 0.159,
    "pythia-12b": 0.065,
    "starchat": 0.052,
    "ultralm-65b": 0.600,  # not in the score table: the KARMA strategies drop it
}
MODELS = sorted(S_PREF)
END_PHRASE = "Is there anything else I can help with?"


def _title(topic: str) -> str:
    return " ".join(w.capitalize() for w in topic.split())


# --------------------------------------------------------------------------- tasks
# Each task: rng -> (source, instruction, good(rng) -> str, bad(rng) -> str)
def task_lowercase(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    instr = (
        f"Write two sentences about {topic}. Your entire response must be in lowercase "
        "letters, with no capital letters at all."
    )
    return (
        "ifeval_lowercase",
        instr,
        lambda r: " ".join(r.sample(s, 2)).lower(),
        lambda r: " ".join(r.sample(s, 2)),
    )


def task_uppercase(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    instr = f"Describe {topic} in one sentence written entirely in capital letters."
    return ("ifeval_uppercase", instr, lambda r: r.choice(s).upper(), lambda r: r.choice(s))


def task_bullets(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    instr = (
        f"List exactly 3 facts about {topic} as a markdown bullet list. Use '* ' for each "
        "bullet and write nothing else."
    )

    def good(r: random.Random) -> str:
        return "\n".join("* " + x for x in r.sample(s, 3))

    def bad(r: random.Random) -> str:
        if r.random() < 0.5:
            return " ".join(s)
        return "\n".join("* " + x for x in r.sample(s, 2))

    return ("ifeval_bullets", instr, good, bad)


def task_n_sentences(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    n = rng.choice([1, 2])
    word = {1: "one sentence", 2: "exactly two sentences"}[n]
    instr = f"Explain {topic} in {word}."
    return (
        "ifeval_sentences",
        instr,
        lambda r: " ".join(r.sample(s, n)),
        lambda r: " ".join(r.sample(s, 3 if n == 2 else r.choice([2, 3]))),
    )


def task_word_limit(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    limit = max(len(x.split()) for x in s) + rng.choice([1, 2, 3])
    instr = f"Describe {topic} in fewer than {limit} words."
    return (
        "ifeval_length",
        instr,
        lambda r: r.choice(s),
        lambda r: " ".join(r.sample(s, r.choice([2, 3]))),
    )


def task_keyword(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    kw, s = TOPICS[topic]
    with_kw = [x for x in s if kw in x.lower()]
    without = [x for x in s if kw not in x.lower()]
    instr = f"Write one sentence about {topic} that includes the word '{kw}'."
    return ("ifeval_keyword", instr, lambda r: r.choice(with_kw), lambda r: r.choice(without))


def task_end_phrase(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    instr = (
        f"Write two sentences about {topic}. Finish your response with this exact phrase: "
        f"{END_PHRASE}"
    )
    return (
        "ifeval_end_phrase",
        instr,
        lambda r: " ".join(r.sample(s, 2)) + " " + END_PHRASE,
        lambda r: " ".join(r.sample(s, 2)),
    )


def task_title(rng: random.Random):
    topic = rng.choice(list(TOPICS))
    s = TOPICS[topic][1]
    instr = (
        f"Write a short paragraph about {topic}. Give it a title wrapped in double angular "
        "brackets, such as <<my title>>."
    )
    return (
        "ifeval_title",
        instr,
        lambda r: f"<<{_title(topic)}>>\n" + " ".join(r.sample(s, 2)),
        lambda r: f"{_title(topic)}\n" + " ".join(r.sample(s, 2)),
    )


def task_capital(rng: random.Random):
    country, capital = rng.choice(CAPITALS)
    others = [c for _, c in CAPITALS if c != capital]

    def wrong(r: random.Random) -> str:
        return (
            COMMON_MISTAKES.get(country)
            if r.random() < 0.6 and country in COMMON_MISTAKES
            else r.choice(others)
        )  # type: ignore[return-value]

    if rng.random() < 0.5:
        instr = f"What is the capital of {country}? Answer in one sentence."
        forms = [
            "The capital of {c} is {x}.",
            "{x} is the capital of {c}.",
            "{c}'s capital city is {x}.",
            "The capital city of {c} is {x}.",
            "It is {x}.",
            "{c} has {x} as its capital.",
        ]
        return (
            "facts_capital",
            instr,
            lambda r: r.choice(forms).format(c=country, x=capital),
            lambda r: r.choice(forms).format(c=country, x=wrong(r)),
        )
    instr = (
        f'Give the capital of {country} as a JSON object with the keys "country" and '
        '"capital". Output only the JSON.'
    )

    def bad(r: random.Random) -> str:
        if r.random() < 0.5:
            return f"The capital of {country} is {capital}."
        return json.dumps({"country": country, "capital": wrong(r)})

    return (
        "ifeval_json",
        instr,
        lambda r: json.dumps({"country": country, "capital": capital}),
        bad,
    )


def task_arithmetic(rng: random.Random):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    op = rng.choice(["+", "-", "*"])
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    sym = {"+": "+", "-": "-", "*": "x"}[op]
    if rng.random() < 0.3:
        instr = f"What is {a} {sym} {b}? Reply with the number only."
        return (
            "math_arithmetic",
            instr,
            lambda r: str(value),
            lambda r: str(value + r.choice([-10, -2, -1, 1, 2, 10])),
        )
    name = rng.choice(["Ana", "Tom", "Mia", "Leo", "Sara", "Omar"])
    item = rng.choice(["apples", "books", "marbles", "stickers", "pencils"])
    if op == "*":
        story = f"{name} has {a} boxes with {b} {item} in each box."
        ask = f"How many {item} does {name} have in total?"
    elif op == "+":
        story = f"{name} has {a} {item} and gets {b} more."
        ask = f"How many {item} does {name} have now?"
    else:
        story = f"{name} has {a} {item} and gives away {b}."
        ask = f"How many {item} are left?"
    instr = f"{story} {ask} End your answer with 'The answer is N.' where N is the number."

    def good(r: random.Random) -> str:
        return r.choice(
            [
                f"{a} {sym} {b} = {value}. The answer is {value}.",
                f"We compute {a} {sym} {b}, which gives {value}. The answer is {value}.",
                f"The answer is {value}.",
            ]
        )

    def bad(r: random.Random) -> str:
        w = value + r.choice([-3, -1, 1, 5])
        return (
            f"{a} {sym} {b} = {w}. The answer is {w}."
            if r.random() < 0.7
            else f"{name} has {value} {item}."
        )

    return ("math_word_problem", instr, good, bad)


def task_mc(rng: random.Random):
    q, right, wrongs = rng.choice(MC_FACTS)
    options = [right, *wrongs]
    rng.shuffle(options)
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {o}" for i, o in enumerate(options))
    key = letters[options.index(right)]
    instr = f"{q}\n{body}\nAnswer with the letter of the correct option."

    def good(r: random.Random) -> str:
        return r.choice(
            [
                f"{key}",
                f"{key}. {right}",
                f"The answer is {key}. {right}.",
                f"The answer is {key}.",
                f"{key} ({right})",
                f"Answer: {key}",
            ]
        )

    def bad(r: random.Random) -> str:
        w = r.choice([i for i in range(4) if letters[i] != key])
        return r.choice(
            [
                f"{letters[w]}",
                f"{letters[w]}. {options[w]}",
                f"The answer is {letters[w]}. {options[w]}.",
            ]
        )

    return ("stem_multiple_choice", instr, good, bad)


def task_science(rng: random.Random):
    q, right, wrong = rng.choice(SCIENCE_QA)
    instr = f"{q} Answer in one sentence."
    return ("science_commonsense", instr, lambda r: _vary(r, right), lambda r: _vary(r, wrong))


def _vary(r: random.Random, sentence: str) -> str:
    """The same one-sentence answer in one of a few phrasings."""
    low = sentence[0].lower() + sentence[1:]
    return r.choice(
        [
            sentence,
            f"In short, {low}",
            f"Simply put, {low}",
            f"Put simply, {low}",
            f"The short answer: {low}",
        ]
    )


TASKS = [
    task_lowercase,
    task_uppercase,
    task_bullets,
    task_n_sentences,
    task_word_limit,
    task_keyword,
    task_end_phrase,
    task_title,
    task_capital,
    task_capital,
    task_arithmetic,
    task_arithmetic,
    task_mc,
    task_mc,
    task_science,
]


# --------------------------------------------------------------------------- ratings
def _judge(rng: random.Random, good: bool) -> tuple[object, float, dict]:
    """A noisy AI judge: mostly right, sometimes flips (about 12%)."""
    looks_good = good if rng.random() > 0.12 else not good
    overall: object = (
        rng.choice([7.0, 7.5, 8.0, 8.5, 9.0])
        if looks_good
        else rng.choice([2.0, 3.0, 4.0, 5.0, 6.0])
    )
    aspects = {}
    for aspect in ("instruction_following", "honesty", "truthfulness", "helpfulness"):
        base = rng.choice([4, 5]) if looks_good else rng.choice([1, 2, 3])
        aspects[aspect] = {"Rating": "N/A" if rng.random() < 0.03 else str(base)}
    nums = [int(a["Rating"]) for a in aspects.values() if a["Rating"] != "N/A"]
    fine = round(sum(nums) / len(nums), 2) if nums else 0.0
    u = rng.random()
    if u < 0.02:
        overall = "N/A"
    elif u < 0.06:
        overall = f"{overall:g}"  # a numeric string
    return overall, fine, aspects


def make_records(n: int = N_INSTRUCTIONS, seed: int = SEED) -> list[dict]:
    """The demo records (deterministic in ``seed``)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n:
        source, instr, good, bad = rng.choice(TASKS)(rng)
        if instr in seen:
            continue
        seen.add(instr)
        models = rng.sample(MODELS, 4)
        completions = []
        for model in models:
            p_good = min(0.97, max(0.03, 0.1 + 0.85 * S_PREF[model] + rng.gauss(0.0, 0.1)))
            is_good = rng.random() < p_good
            response = good(rng) if is_good else bad(rng)
            if rng.random() < 0.015:
                response = ""  # a failed generation
            overall, fine, aspects = _judge(rng, is_good and bool(response))
            completions.append(
                {
                    "model": model,
                    "response": response,
                    "annotations": aspects,
                    "fine-grained_score": fine,
                    "overall_score": overall,
                }
            )
        records.append(
            {"source": source, "instruction": instr, "models": models, "completions": completions}
        )
    return records


def main(out: Path = OUT) -> None:
    records = make_records()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({len(records)} instructions, {len(text) / 1e6:.2f} MB)", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT)
