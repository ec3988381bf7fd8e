"""Items of the mini IFEval suite: verifiable instructions, each with a checked reference."""

from __future__ import annotations

import json

from karma.evaluation.tasks.mini_mmlu import CAPITALS

END = "Is there anything else I can help with?"


def _if(prompt: str, ids: list[str], kwargs: list[dict], reference: str) -> dict:
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs, "reference": reference}


def _case_and_punctuation() -> list[dict]:
    """Lower case, upper case, no commas."""
    rows = []
    for country, capital in CAPITALS[:6]:
        rows.append(
            _if(
                f"What is the capital of {country}? Your entire response should be in English, "
                "and in all lowercase letters. No capital letters are allowed.",
                ["change_case:english_lowercase"],
                [{}],
                f"the capital of {country.lower()} is {capital.lower()}.",
            )
        )
    for country, capital in CAPITALS[6:12]:
        rows.append(
            _if(
                f"Name the capital city of {country}. Your entire response should be in English, "
                "and in all capital letters.",
                ["change_case:english_capital"],
                [{}],
                f"THE CAPITAL OF {country.upper()} IS {capital.upper()}.",
            )
        )
    topics = [
        "the water cycle",
        "photosynthesis",
        "gravity",
        "the Moon",
        "volcanoes",
        "electricity",
    ]
    for t in topics:
        rows.append(
            _if(
                f"Explain {t} in one or two sentences. Do not use any commas in your response.",
                ["punctuation:no_comma"],
                [{}],
                f"This is a short explanation of {t}. It is simple and clear.",
            )
        )
    return rows


def _length_keywords_ends() -> list[dict]:
    """Word limits, keywords, quotation marks, end phrases."""
    rows = []
    for a, b in [(12, 7), (25, 17), (9, 8), (40, 2)]:
        rows.append(
            _if(
                f"What is {a} plus {b}? Answer in fewer than 20 words.",
                ["length_constraints:number_words"],
                [{"relation": "less than", "num_words": 20}],
                f"{a} plus {b} is {a + b}.",
            )
        )
    for a, b in [(6, 7), (11, 3), (5, 9), (12, 4)]:
        rows.append(
            _if(
                f"What is {a} times {b}? Include the keywords 'answer' and 'multiply' in your "
                "response.",
                ["keywords:existence"],
                [{"keywords": ["answer", "multiply"]}],
                f"To multiply {a} by {b}: the answer is {a * b}.",
            )
        )
    for t in ["the Sun", "the ocean", "a tree", "rain"]:
        rows.append(
            _if(
                f"Write one sentence about {t}. Wrap your entire response with double quotation "
                "marks.",
                ["startend:quotation"],
                [{}],
                f'"Here is one sentence about {t}."',
            )
        )
    for t in ["planets", "cells", "atoms", "magnets"]:
        rows.append(
            _if(
                f"Give a short fact about {t}. Finish your response with this exact phrase "
                f"{END} No other words should follow this phrase.",
                ["startend:end_checker"],
                [{"end_phrase": END}],
                f"{t.capitalize()} are studied in science. {END}",
            )
        )
    return rows


def _formats_and_content() -> list[dict]:
    """JSON, titles, bullet lists, two instructions at once, postscripts, forbidden words."""
    rows = []
    for country, capital in CAPITALS[:4]:
        rows.append(
            _if(
                f"Give the capital of {country} and its country. Entire output should be wrapped "
                "in JSON format. You can use markdown ticks such as ```.",
                ["detectable_format:json_format"],
                [{}],
                json.dumps({"country": country, "capital": capital}),
            )
        )
    for t in ["spring", "the stars", "a river", "friendship"]:
        rows.append(
            _if(
                f"Write a two line poem about {t}. Your answer must contain a title, wrapped in "
                "double angular brackets, such as <<poem of joy>>.",
                ["detectable_format:title"],
                [{}],
                f"<<A poem about {t}>>\nA short line about {t}.\nAnother line to end.",
            )
        )
    for t in ["healthy food", "saving energy", "planets"]:
        rows.append(
            _if(
                f"List facts about {t}. Your answer must contain exactly 3 bullet points. Use the "
                "markdown bullet points such as:\n* This is point 1.\n* This is point 2",
                ["detectable_format:number_bullet_lists"],
                [{"num_bullets": 3}],
                f"* First fact about {t}.\n* Second fact about {t}.\n* Third fact about {t}.",
            )
        )
    for t in ["a cat", "the weather"]:
        rows.append(
            _if(
                f"Describe {t} briefly. Answer in all lowercase letters, without any commas.",
                ["change_case:english_lowercase", "punctuation:no_comma"],
                [{}, {}],
                f"this is a brief description of {t} in plain words.",
            )
        )
    rows.append(
        _if(
            "Write a short note to a friend. At the end of your response, please explicitly add a "
            "postscript starting with P.S.",
            ["detectable_content:postscript"],
            [{"postscript_marker": "P.S."}],
            "Hello friend, I hope you are well.\nP.S. See you soon.",
        )
    )
    rows.append(
        _if(
            "Explain what a thermometer does without using the words 'hot' or 'cold'.",
            ["keywords:forbidden_words"],
            [{"forbidden_words": ["hot", "cold"]}],
            "A thermometer measures temperature.",
        )
    )
    return rows


def ifeval() -> list[dict]:
    """IFEval schema (key, prompt, instruction_id_list, kwargs) + a checked reference answer."""
    rows = [*_case_and_punctuation(), *_length_keywords_ends(), *_formats_and_content()]
    for i, row in enumerate(rows):
        row["key"] = 1000 + i
    return rows
