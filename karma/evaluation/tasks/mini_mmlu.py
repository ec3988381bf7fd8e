"""Items of the mini MMLU-STEM (4 options) and MMLU-Pro (10 options) suites: facts written
by hand, arithmetic computed."""

from __future__ import annotations

import random

LETTERS = "ABCDEFGHIJ"

# ---------------------------------------------------------------- shared facts
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Egypt", "Cairo"),
    ("Brazil", "Brasilia"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Portugal", "Lisbon"),
]

# (question, correct, three distractors): STEM facts for mini MMLU-STEM.
STEM_FACTS = [
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("What is the chemical symbol for sodium?", "Na", ["So", "Sd", "N"]),
    (
        "Which gas do plants absorb from the air for photosynthesis?",
        "Carbon dioxide",
        ["Oxygen", "Nitrogen", "Helium"],
    ),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("Which planet is the largest in the Solar System?", "Jupiter", ["Saturn", "Earth", "Mars"]),
    ("At sea level, water boils at how many degrees Celsius?", "100", ["50", "0", "212"]),
    ("At sea level, water freezes at how many degrees Celsius?", "0", ["100", "32", "-10"]),
    ("What is the SI unit of force?", "Newton", ["Joule", "Watt", "Pascal"]),
    ("What is the SI unit of energy?", "Joule", ["Newton", "Volt", "Ampere"]),
    ("What is the SI unit of electric current?", "Ampere", ["Volt", "Ohm", "Watt"]),
    ("How many protons does a carbon atom have?", "6", ["12", "8", "4"]),
    ("What is the chemical formula of water?", "H2O", ["CO2", "O2", "NaCl"]),
    (
        "Which part of the cell contains most of its DNA?",
        "The nucleus",
        ["The cell membrane", "The ribosome", "The cell wall"],
    ),
    (
        "Which organelle releases energy from food in animal cells?",
        "The mitochondrion",
        ["The chloroplast", "The nucleus", "The vacuole"],
    ),
    ("What is the binary number 101 in decimal?", "5", ["3", "101", "6"]),
    ("What is the binary number 1000 in decimal?", "8", ["4", "16", "1000"]),
    ("How many bits are in one byte?", "8", ["4", "16", "10"]),
    ("A triangle has angles that add up to how many degrees?", "180", ["90", "360", "270"]),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    (
        "What is the approximate speed of light in a vacuum?",
        "300,000 km per second",
        ["300 km per second", "3,000 km per hour", "30 km per second"],
    ),
    (
        "Which force keeps the Moon in orbit around the Earth?",
        "Gravity",
        ["Magnetism", "Friction", "Air pressure"],
    ),
    ("What is the pH of pure water at 25 degrees Celsius?", "7", ["0", "1", "14"]),
    (
        "Which blood cells carry oxygen around the body?",
        "Red blood cells",
        ["White blood cells", "Platelets", "Nerve cells"],
    ),
    ("What is the derivative of x squared with respect to x?", "2x", ["x", "x squared", "2"]),
    ("Which element has the atomic number 1?", "Hydrogen", ["Helium", "Oxygen", "Carbon"]),
    ("What is the value of pi rounded to two decimal places?", "3.14", ["3.41", "2.72", "3.12"]),
    (
        "What kind of energy does a moving car have?",
        "Kinetic energy",
        ["Nuclear energy", "Chemical energy only", "No energy"],
    ),
    ("What does a thermometer measure?", "Temperature", ["Mass", "Pressure", "Volume"]),
]


def _arith(rng: random.Random) -> tuple[str, int]:
    kind = rng.choice(["add", "sub", "mul", "sq"])
    a, b = rng.randint(12, 99), rng.randint(2, 49)
    if kind == "add":
        return f"What is {a} plus {b}?", a + b
    if kind == "sub":
        return f"What is {a} minus {b}?", a - b
    if kind == "mul":
        a, b = rng.randint(3, 19), rng.randint(3, 12)
        return f"What is {a} times {b}?", a * b
    a = rng.randint(4, 20)
    return f"What is {a} squared?", a * a


def _numeric_options(rng: random.Random, answer: int, n: int) -> list[int]:
    options = {answer}
    deltas = [1, -1, 2, -2, 10, -10, 3, -3, 5, -5, 11, -11, 20, -20]
    while len(options) < n:
        options.add(answer + rng.choice(deltas) * rng.randint(1, 2))
    out = sorted(options)
    rng.shuffle(out)
    return out


def mmlu_stem() -> list[dict]:
    """48 items, 4 options, MMLU schema: question, subject, choices, answer (index)."""
    rng = random.Random(1)
    rows = []
    for q, right, wrong in STEM_FACTS:
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append(
            {
                "question": q,
                "subject": "science",
                "choices": choices,
                "answer": choices.index(right),
            }
        )
    seen = set()
    while len(seen) < 20:
        q, ans = _arith(rng)
        if q in seen:
            continue
        seen.add(q)
        opts = _numeric_options(rng, ans, 4)
        rows.append(
            {
                "question": q,
                "subject": "elementary_mathematics",
                "choices": [str(o) for o in opts],
                "answer": opts.index(ans),
            }
        )
    rng.shuffle(rows)
    return rows


# (question, correct, nine distractors) for mini MMLU-Pro (ten options).
PRO_FACTS = [
    (
        "Which planet is known as the Red Planet?",
        "Mars",
        [
            "Venus",
            "Jupiter",
            "Saturn",
            "Mercury",
            "Neptune",
            "Uranus",
            "Earth",
            "Pluto",
            "The Moon",
        ],
    ),
    (
        "What is the chemical symbol for iron?",
        "Fe",
        ["Ir", "In", "I", "F", "Fr", "Au", "Ag", "Pb", "Zn"],
    ),
    (
        "Which gas makes up most of the Earth's atmosphere?",
        "Nitrogen",
        [
            "Oxygen",
            "Carbon dioxide",
            "Argon",
            "Hydrogen",
            "Helium",
            "Neon",
            "Methane",
            "Ozone",
            "Water vapour",
        ],
    ),
    (
        "What is the hardest natural substance?",
        "Diamond",
        ["Gold", "Iron", "Quartz", "Granite", "Glass", "Silver", "Copper", "Marble", "Graphite"],
    ),
    (
        "How many chromosomes does a typical human body cell have?",
        "46",
        ["23", "44", "48", "42", "24", "92", "12", "64", "32"],
    ),
    (
        "Which organ pumps blood through the human body?",
        "The heart",
        [
            "The liver",
            "The lungs",
            "The brain",
            "The kidneys",
            "The stomach",
            "The skin",
            "The spleen",
            "The pancreas",
            "The bladder",
        ],
    ),
    (
        "Which scientist proposed the three laws of motion?",
        "Isaac Newton",
        [
            "Albert Einstein",
            "Galileo Galilei",
            "Charles Darwin",
            "Marie Curie",
            "Nikola Tesla",
            "Niels Bohr",
            "Michael Faraday",
            "Johannes Kepler",
            "Louis Pasteur",
        ],
    ),
    (
        "What is the largest ocean on Earth?",
        "The Pacific Ocean",
        [
            "The Atlantic Ocean",
            "The Indian Ocean",
            "The Arctic Ocean",
            "The Southern Ocean",
            "The Mediterranean Sea",
            "The Caribbean Sea",
            "The North Sea",
            "The Red Sea",
            "The Baltic Sea",
        ],
    ),
    (
        "What is the square root of 144?",
        "12",
        ["14", "11", "13", "10", "16", "72", "24", "9", "144"],
    ),
    (
        "What is the main source of energy for the Earth's climate?",
        "The Sun",
        [
            "The Moon",
            "Volcanoes",
            "Ocean tides",
            "The Earth's core",
            "Lightning",
            "Wind",
            "Coal",
            "Cosmic rays",
            "Starlight",
        ],
    ),
    (
        "In economics, what does GDP stand for?",
        "Gross domestic product",
        [
            "General domestic price",
            "Gross daily profit",
            "Global demand projection",
            "Government debt payment",
            "Gross dividend payout",
            "Graded delivery price",
            "General development plan",
            "Gross direct production",
            "Global domestic product",
        ],
    ),
    (
        "How many minutes are in three hours?",
        "180",
        ["120", "150", "160", "190", "200", "210", "240", "90", "300"],
    ),
]
for _country, _capital in CAPITALS[:8]:
    _others = [c for _, c in CAPITALS if c != _capital] + ["London", "Vienna", "Dublin"]
    PRO_FACTS.append((f"What is the capital of {_country}?", _capital, _others[:9]))


def mmlu_pro() -> list[dict]:
    """40 items, 10 options, MMLU-Pro schema: question, options, answer (letter), answer_index."""
    rng = random.Random(2)
    rows = []
    for q, right, wrong in PRO_FACTS:
        assert len(wrong) == 9 and right not in wrong, q
        options = [right, *wrong]
        rng.shuffle(options)
        i = options.index(right)
        rows.append(
            {
                "question": q,
                "options": options,
                "answer": LETTERS[i],
                "answer_index": i,
                "category": "science",
            }
        )
    seen = set()
    while len(rows) < 40:
        q, ans = _arith(rng)
        if q in seen:
            continue
        seen.add(q)
        opts = _numeric_options(rng, ans, 10)
        i = opts.index(ans)
        rows.append(
            {
                "question": q,
                "options": [str(o) for o in opts],
                "answer": LETTERS[i],
                "answer_index": i,
                "category": "math",
            }
        )
    rng.shuffle(rows)
    return rows
