"""Regenerate the embedded mini task suites (``karma/evaluation/tasks/embedded/*.jsonl``).

The items are written here by hand (facts) or computed (arithmetic), in the domain of the demo
preference data: verifiable instructions, formats, lengths, keywords, arithmetic, capitals and
simple science. Every answer is checked in ``tests/test_tasks.py``.

    python -m karma.evaluation.tasks.make_tasks
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "embedded"
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


# (activity, context, right ending, three wrong endings) for mini HellaSwag.
HELLASWAG = [
    (
        "Boiling water",
        "A man fills a kettle with water and switches it on. After a few minutes, the",
        "water starts to bubble and the kettle clicks off.",
        [
            "kettle turns into a cat and walks away.",
            "water freezes into a block of ice.",
            "man reads the kettle a bedtime story.",
        ],
    ),
    (
        "Writing an email",
        "She opens her laptop and starts a new email to her teacher. She",
        "types a short greeting and asks about the homework.",
        [
            "throws the laptop into the swimming pool.",
            "eats the keyboard one key at a time.",
            "paints the screen bright green with a brush.",
        ],
    ),
    (
        "Making tea",
        "He puts a tea bag in a cup and pours hot water over it. Then he",
        "waits a few minutes and removes the tea bag.",
        [
            "plants the cup in the garden.",
            "pours the tea into his shoes.",
            "sends the tea bag a letter by post.",
        ],
    ),
    (
        "Doing homework",
        "A student reads the maths problem: what is seven plus five. She",
        "writes the answer twelve in her notebook.",
        [
            "writes the answer seventy five in red.",
            "tears the notebook and eats the pages.",
            "climbs onto the roof to find the answer.",
        ],
    ),
    (
        "Science class",
        "The teacher drops a ball and a feather in a vacuum tube. The students see",
        "both objects fall at the same speed.",
        [
            "the feather fly up and leave the room.",
            "the ball melt into a puddle.",
            "the tube sing a short song.",
        ],
    ),
    (
        "Cooking pasta",
        "A woman brings a pot of salted water to the boil and adds the pasta. She",
        "stirs it and cooks it for about ten minutes.",
        [
            "puts the pot in the freezer for a week.",
            "throws the pasta out of the window.",
            "irons the pasta flat on the table.",
        ],
    ),
    (
        "Planting seeds",
        "A boy puts seeds in a pot of soil and waters them. After a week,",
        "small green shoots appear above the soil.",
        [
            "the pot turns into gold.",
            "the seeds fly to the Moon.",
            "the soil starts to speak French.",
        ],
    ),
    (
        "Travelling",
        "The travellers land in Paris, the capital of France. They",
        "take a taxi from the airport to their hotel.",
        [
            "swim back across the ocean immediately.",
            "decide that Paris is in Japan.",
            "fold the airport into a paper plane.",
        ],
    ),
    (
        "Riding a bike",
        "A girl puts on her helmet and gets on her bicycle. She",
        "pushes the pedals and rides down the street.",
        [
            "puts the bicycle in her pocket.",
            "rides the bicycle up a tree to the sky.",
            "eats the helmet for breakfast.",
        ],
    ),
    (
        "Washing dishes",
        "After dinner, he fills the sink with warm soapy water. He",
        "scrubs the plates and rinses them clean.",
        [
            "fills the plates with sand and buries them.",
            "sings to the plates until they dry.",
            "mails the sink to his grandmother.",
        ],
    ),
    (
        "Measuring",
        "To find the length of the table, the carpenter takes out a tape measure. He",
        "stretches it from one end of the table to the other.",
        [
            "eats the tape measure slowly.",
            "measures the colour of the sky instead.",
            "throws the table into the lake.",
        ],
    ),
    (
        "Weather",
        "Dark clouds gather and the wind gets stronger. Soon,",
        "it begins to rain heavily.",
        [
            "the clouds turn into chocolate.",
            "the sun rises in the west at midnight.",
            "the wind writes a poem on the wall.",
        ],
    ),
    (
        "Chemistry lab",
        "The student adds a few drops of vinegar to baking soda in a beaker. The mixture",
        "fizzes and releases bubbles of gas.",
        ["turns into a solid gold coin.", "starts to play the piano.", "flies out of the window."],
    ),
    (
        "Reading",
        "He opens the book at the first chapter and sits in a comfortable chair. He",
        "reads the first page carefully.",
        [
            "cooks the book in the oven.",
            "uses the chair to read the book aloud.",
            "plants the book in the garden.",
        ],
    ),
    (
        "Brushing teeth",
        "Before bed, she puts toothpaste on her toothbrush. She",
        "brushes her teeth for two minutes and rinses her mouth.",
        [
            "brushes the floor of the kitchen with it.",
            "paints a picture on the ceiling.",
            "gives the toothbrush to a fish.",
        ],
    ),
    (
        "Making a list",
        "The manager writes a list of three tasks for the day. First,",
        "she answers the urgent emails.",
        [
            "she moves the office to the Moon.",
            "she turns the list into a bird.",
            "she forgets how to read forever.",
        ],
    ),
    (
        "Astronomy",
        "At night, the astronomer points the telescope at the Moon. She",
        "sees craters on its surface.",
        [
            "sees the Moon wave back at her.",
            "hears the telescope laugh loudly.",
            "smells the stars through the lens.",
        ],
    ),
    (
        "Baking bread",
        "The baker mixes flour, water, yeast and salt into a dough. He",
        "lets the dough rise and then bakes it in a hot oven.",
        [
            "throws the dough onto the roof.",
            "freezes the dough and wears it as a hat.",
            "teaches the dough to swim.",
        ],
    ),
    (
        "Shopping",
        "At the market, he picks up three apples and two bananas. He",
        "pays the seller and puts the fruit in his bag.",
        [
            "plants the bananas in the street.",
            "juggles the seller.",
            "eats the shopping bag instead.",
        ],
    ),
    (
        "Exercise",
        "The runner ties her shoes and stretches her legs. She",
        "starts jogging slowly around the park.",
        [
            "starts running on the ceiling.",
            "takes off her legs and rests.",
            "jogs into the sea and lives there.",
        ],
    ),
    (
        "Electricity",
        "The boy connects a battery, a wire and a small bulb in a closed circuit. The bulb",
        "lights up.",
        ["turns into water.", "starts to grow leaves.", "runs away from the table."],
    ),
    (
        "Magnets",
        "The teacher holds a magnet close to a pile of iron nails. The nails",
        "jump towards the magnet and stick to it.",
        ["start to melt into juice.", "fly away from the room.", "turn into wooden sticks."],
    ),
    (
        "Ice melting",
        "She leaves an ice cube on a plate in the warm kitchen. After an hour,",
        "the ice cube has melted into a small puddle.",
        [
            "the ice cube has grown into a glacier.",
            "the plate has eaten the ice cube.",
            "the ice cube has become a stone.",
        ],
    ),
    (
        "Translation",
        "The student is asked to translate the word 'bonjour' from French. She",
        "writes that it means hello in English.",
        [
            "writes that it means elephant in English.",
            "sets the dictionary on fire.",
            "translates it into a song about cars.",
        ],
    ),
    (
        "Counting",
        "The child counts the coins on the table: one, two, three, four. Then",
        "she says five when she reaches the last coin.",
        [
            "she says ninety when she reaches the last coin.",
            "the coins count her instead.",
            "she throws the table into the air.",
        ],
    ),
    (
        "Writing a poem",
        "The poet chooses the topic of the sea and picks up a pen. He",
        "writes the first line about waves on the shore.",
        [
            "writes the first line on the surface of the sea.",
            "drinks the ink from the pen.",
            "throws the pen at the sea.",
        ],
    ),
    (
        "Photosynthesis",
        "A plant is placed near a sunny window and watered every day. Over time, the plant",
        "grows taller and its leaves stay green.",
        [
            "turns into a plastic toy.",
            "walks to another room at night.",
            "stops needing any light or water.",
        ],
    ),
    (
        "Summarising",
        "The teacher asks the class to summarise the story in one sentence. A student",
        "writes one short sentence about the main event.",
        [
            "writes a ten page novel about cats.",
            "draws a map of the Moon.",
            "refuses to read anything ever again.",
        ],
    ),
    (
        "Fixing a tyre",
        "The cyclist finds a hole in the tyre of his bicycle. He",
        "patches the hole and pumps the tyre full of air.",
        [
            "sells the bicycle to a bird.",
            "fills the tyre with soup.",
            "paints the hole blue and rides on.",
        ],
    ),
    (
        "Recycling",
        "After lunch, she collects the empty bottles and cans. She",
        "puts them in the recycling bin.",
        [
            "buries them in the school garden.",
            "uses them as a pillow.",
            "throws them at passing cars.",
        ],
    ),
    (
        "Sunset",
        "The sun slowly moves lower in the sky in the evening. Soon,",
        "it disappears below the horizon and it gets dark.",
        [
            "it rises again straight away at midnight.",
            "it turns into a large green moon.",
            "it lands in the garden.",
        ],
    ),
    (
        "Cleaning",
        "He notices dust on the bookshelf. He",
        "takes a cloth and wipes the shelves clean.",
        [
            "adds more dust to the shelves.",
            "eats the dust with a spoon.",
            "moves the bookshelf to the roof.",
        ],
    ),
    (
        "Geography class",
        "The teacher points at a map and asks for the capital of Italy. A student",
        "answers that the capital of Italy is Rome.",
        [
            "answers that the capital of Italy is Tokyo.",
            "eats the map quickly.",
            "points at the ceiling and leaves.",
        ],
    ),
    (
        "Sound",
        "The musician plucks a guitar string. The string",
        "vibrates and makes a sound.",
        ["turns into a snake.", "melts onto the floor.", "plays by itself for a week."],
    ),
    (
        "Phone call",
        "The phone rings and she picks it up. She",
        "says hello and listens to the caller.",
        [
            "puts the phone in the oven.",
            "answers the door instead of the phone.",
            "throws the phone into a river and smiles.",
        ],
    ),
    (
        "Gardening",
        "It has not rained for two weeks and the flowers look dry. The gardener",
        "waters the flowers with a hose.",
        [
            "covers the flowers in salt.",
            "cuts all the flowers and paints them.",
            "asks the flowers to find water.",
        ],
    ),
    (
        "Sorting",
        "The teacher lists the numbers 9, 2, 7, 4. Sorted from smallest to largest,",
        "the list is 2, 4, 7, 9.",
        ["the list is 9, 7, 4, 2.", "the list is 2, 9, 4, 7.", "the list is a bird."],
    ),
    (
        "Moon phases",
        "Over the month, the children draw the shape of the Moon every night. They notice that",
        "the Moon seems to change shape from night to night.",
        [
            "the Moon is square every night.",
            "the Moon falls into the sea.",
            "the Moon talks to them.",
        ],
    ),
    (
        "Building a tower",
        "The child stacks wooden blocks one on top of another. When the tower is very tall,",
        "it wobbles and falls over.",
        ["it flies away like a bird.", "it turns into soup.", "it starts to sing loudly."],
    ),
    (
        "Answering a question",
        "The assistant is asked for the boiling point of water at sea level. It",
        "answers that water boils at 100 degrees Celsius.",
        [
            "answers that water boils at 5 degrees Celsius.",
            "answers with a recipe for cake.",
            "refuses to ever answer questions again.",
        ],
    ),
    (
        "Packing",
        "Before the trip, she packs her suitcase with clothes. She",
        "closes the zip and carries the suitcase to the door.",
        [
            "packs the house inside the suitcase.",
            "unpacks the clothes onto the roof.",
            "mails the suitcase to the Moon.",
        ],
    ),
    (
        "Evaporation",
        "A wet towel is hung outside on a warm, windy day. After a few hours,",
        "the towel is dry.",
        [
            "the towel is wetter than before.",
            "the towel has turned to stone.",
            "the towel has flown to another city.",
        ],
    ),
]


def hellaswag() -> list[dict]:
    """HellaSwag schema: activity_label, ctx, endings (4), label (index)."""
    rng = random.Random(3)
    rows = []
    for i, (act, ctx, right, wrong) in enumerate(HELLASWAG):
        endings = [right, *wrong]
        rng.shuffle(endings)
        rows.append(
            {
                "ind": i,
                "activity_label": act,
                "ctx": ctx,
                "endings": endings,
                "label": endings.index(right),
            }
        )
    return rows


# (question, correct, distractors): ARC-Easy (recall of simple science facts).
ARC_EASY = [
    ("Which of these is a source of light?", "The Sun", ["A rock", "A shadow", "A mirror"]),
    ("What do plants need to make their own food?", "Sunlight", ["Darkness", "Sand", "Plastic"]),
    ("Which state of matter has a fixed shape?", "Solid", ["Liquid", "Gas", "Steam"]),
    (
        "What happens to water when it is heated to 100 degrees Celsius at sea level?",
        "It boils",
        ["It freezes", "It becomes solid", "Nothing happens"],
    ),
    ("Which organ do humans use to breathe?", "Lungs", ["Stomach", "Heart", "Bones"]),
    ("Which animal is a mammal?", "A dog", ["A lizard", "A shark", "A frog"]),
    ("What is the closest star to the Earth?", "The Sun", ["The Moon", "Mars", "The North Star"]),
    ("Which material is attracted to a magnet?", "Iron", ["Wood", "Glass", "Paper"]),
    (
        "What is the main gas that humans breathe in to live?",
        "Oxygen",
        ["Carbon dioxide", "Helium", "Smoke"],
    ),
    (
        "Which part of a plant takes in water from the soil?",
        "The roots",
        ["The flowers", "The fruit", "The petals"],
    ),
    (
        "How long does it take the Earth to travel once around the Sun?",
        "About one year",
        ["About one day", "About one hour", "About one week"],
    ),
    (
        "What causes day and night on Earth?",
        "The Earth spinning on its axis",
        ["The Moon blocking the Sun", "Clouds covering the sky", "The Sun turning off"],
    ),
    ("Which of these is a liquid at room temperature?", "Water", ["Ice", "Stone", "Wood"]),
    ("What tool is used to measure mass?", "A balance", ["A ruler", "A clock", "A compass"]),
    ("What do bees collect from flowers to make honey?", "Nectar", ["Sand", "Leaves", "Roots"]),
    ("What is ice?", "Frozen water", ["Melted rock", "Hot steam", "Dry sand"]),
    (
        "Which sense do people use to hear?",
        "Hearing, with the ears",
        ["Taste, with the tongue", "Smell, with the nose", "Touch, with the skin"],
    ),
    ("What shape is the Earth?", "Roughly a sphere", ["A flat square", "A cube", "A cone"]),
    ("Which of these is a renewable source of energy?", "Wind", ["Coal", "Oil", "Natural gas"]),
    ("What do caterpillars turn into?", "Butterflies or moths", ["Birds", "Frogs", "Spiders"]),
    ("Where does rain come from?", "Clouds", ["Rocks", "Trees", "The ground"]),
    (
        "What is the boiling point of water at sea level in degrees Celsius?",
        "100",
        ["0", "50", "10"],
    ),
    ("What does a compass needle point towards?", "North", ["Up", "The Sun", "East only"]),
    (
        "Which of these conducts electricity best?",
        "A copper wire",
        ["A rubber band", "A wooden stick", "A plastic spoon"],
    ),
    ("What is the capital of France?", "Paris", ["Berlin", "Madrid", "Rome"]),
    ("What is the capital of Japan?", "Tokyo", ["Kyoto", "Beijing", "Seoul"]),
    ("What is 5 plus 7?", "12", ["11", "13", "57"]),
    ("What is 9 times 3?", "27", ["12", "24", "93"]),
    ("Which of these animals lays eggs?", "A chicken", ["A cow", "A horse", "A cat"]),
    (
        "What is the Moon?",
        "A natural satellite of the Earth",
        ["A star", "A planet that makes light", "A cloud"],
    ),
    ("Which season is usually the coldest?", "Winter", ["Summer", "Spring", "Autumn"]),
    ("Which part of the body pumps blood?", "The heart", ["The lungs", "The skin", "The hair"]),
    ("What is sand mostly made of?", "Tiny pieces of rock", ["Sugar", "Salt only", "Plastic"]),
    ("Which of these is a planet?", "Mars", ["The Sun", "The Moon", "A comet"]),
    ("What do fish use to breathe under water?", "Gills", ["Lungs", "Fins", "Scales"]),
    (
        "What happens to most metals when they are heated?",
        "They expand",
        ["They shrink to nothing", "They turn into gas at once", "They become wood"],
    ),
    ("Which body part helps people see?", "The eyes", ["The ears", "The feet", "The teeth"]),
    (
        "What is the force that pulls objects towards the ground?",
        "Gravity",
        ["Friction", "Magnetism", "Wind"],
    ),
    ("How many legs does an insect have?", "Six", ["Four", "Eight", "Ten"]),
    ("Which of these is a gas at room temperature?", "Oxygen", ["Iron", "Water", "Salt"]),
    ("What is the largest planet in the Solar System?", "Jupiter", ["Earth", "Mars", "Venus"]),
    (
        "Which of these keeps a house warm in winter?",
        "Insulation in the walls",
        ["Open windows", "Ice on the roof", "A fan blowing cold air"],
    ),
]

# ARC-Challenge: reasoning over facts (two steps, units, cause and effect, experiments).
ARC_CHALLENGE = [
    (
        "A student pushes a box across a rough floor and then across smooth ice with the same "
        "force. Why does the box move farther on the ice?",
        "There is less friction on the ice",
        [
            "The box is lighter on the ice",
            "Gravity is stronger on the floor",
            "The ice pushes the box forward",
        ],
    ),
    (
        "A metal spoon and a wooden spoon are left in the same cup of hot soup. Why does the "
        "metal spoon feel hotter?",
        "Metal conducts heat better than wood",
        [
            "Wood is always colder than metal",
            "The metal spoon is heavier",
            "The soup heats only metal objects",
        ],
    ),
    (
        "Which change is a chemical change?",
        "Iron rusting in wet air",
        ["Ice melting in the sun", "Paper being cut in half", "Water boiling into steam"],
    ),
    (
        "A plant is kept in a dark cupboard for two weeks. What most likely happens?",
        "It turns pale because it cannot photosynthesise",
        [
            "It grows faster than a plant in the sun",
            "It makes more green leaves",
            "It stops needing water",
        ],
    ),
    (
        "Why can we see the Moon at night?",
        "It reflects light from the Sun",
        ["It makes its own light", "It reflects light from the Earth's cities", "It is on fire"],
    ),
    (
        "A ball is thrown straight up. At the very top of its path, what is its speed?",
        "Zero for an instant",
        ["The highest it ever is", "Equal to the speed of light", "Twice the starting speed"],
    ),
    (
        "Which experiment best tests whether sunlight affects plant growth?",
        "Grow identical plants with and without sunlight, keeping everything else the same",
        [
            "Grow one plant in sunlight and give it more water",
            "Grow different kinds of plants in different soils",
            "Measure one plant once",
        ],
    ),
    (
        "If a train travels 60 kilometres in one hour, how far does it travel in 3 hours at the "
        "same speed?",
        "180 kilometres",
        ["63 kilometres", "20 kilometres", "120 kilometres"],
    ),
    (
        "A cyclist rides 45 kilometres in 3 hours. What is her average speed?",
        "15 kilometres per hour",
        ["135 kilometres per hour", "48 kilometres per hour", "42 kilometres per hour"],
    ),
    (
        "Why do we have seasons on Earth?",
        "The Earth's axis is tilted",
        [
            "The Earth is much closer to the Sun in summer",
            "The Sun gets hotter in summer",
            "The Moon blocks the Sun in winter",
        ],
    ),
    (
        "Which is the best way to separate salt from salt water?",
        "Evaporate the water",
        ["Use a magnet", "Pour it through a paper filter", "Freeze it and pick out the salt"],
    ),
    (
        "A sample has a mass of 20 grams and a volume of 10 cubic centimetres. What is its "
        "density?",
        "2 grams per cubic centimetre",
        [
            "200 grams per cubic centimetre",
            "0.5 grams per cubic centimetre",
            "30 grams per cubic centimetre",
        ],
    ),
    (
        "Which animal adaptation best helps an animal survive in a cold climate?",
        "Thick fur and a layer of fat",
        ["Large thin ears", "Bright colours", "Very little body hair"],
    ),
    ("Sound travels fastest through which of these?", "Steel", ["Air", "Water", "A vacuum"]),
    (
        "Why does a cold can of drink get wet on the outside on a warm day?",
        "Water vapour in the air condenses on the cold can",
        [
            "The drink leaks through the metal",
            "The can is melting",
            "The sun makes water out of metal",
        ],
    ),
    (
        "What is the main job of the roots and the stem together in a plant?",
        "To carry water from the soil to the leaves",
        ["To make seeds", "To catch insects", "To make sunlight"],
    ),
    (
        "A recipe needs 3 eggs for 12 cookies. How many eggs are needed for 36 cookies?",
        "9",
        ["6", "12", "15"],
    ),
    ("Which of these is a fossil fuel?", "Coal", ["Sunlight", "Wind", "Wood pellets"]),
    (
        "Why does a balloon rubbed on hair stick to a wall?",
        "It becomes electrically charged",
        [
            "It becomes magnetic like iron",
            "The hair makes it sticky",
            "It becomes lighter than air",
        ],
    ),
    (
        "Water in a puddle disappears on a sunny day. What process causes this?",
        "Evaporation",
        ["Condensation", "Freezing", "Melting"],
    ),
    (
        "Which property of a mineral is tested by scratching it with a steel nail?",
        "Hardness",
        ["Colour", "Smell", "Mass"],
    ),
    (
        "A food chain is grass, rabbit, fox. What would most likely happen if all the foxes left?",
        "The number of rabbits would increase",
        [
            "The grass would grow faster at once and the rabbits would disappear",
            "The rabbits would start eating foxes",
            "Nothing would change",
        ],
    ),
    (
        "Which unit is best for measuring the distance between two cities?",
        "Kilometres",
        ["Millimetres", "Grams", "Litres"],
    ),
    (
        "Why is a thermos good at keeping soup hot?",
        "It reduces the transfer of heat",
        ["It makes heat from nothing", "It is always heavy", "It cools the air around it"],
    ),
    (
        "Which gas do animals breathe out that plants use?",
        "Carbon dioxide",
        ["Oxygen", "Nitrogen", "Helium"],
    ),
    (
        "The capital of Spain is Madrid and the capital of Portugal is Lisbon. Which statement "
        "is true?",
        "Madrid and Lisbon are capitals of different countries",
        [
            "Madrid is the capital of Portugal",
            "Lisbon is the capital of Spain",
            "Madrid and Lisbon are in France",
        ],
    ),
    (
        "A student counts 12 heartbeats in 10 seconds. About how many beats is that per minute?",
        "72",
        ["12", "22", "120"],
    ),
    (
        "Why do astronauts float inside a space station orbiting the Earth?",
        "They and the station are falling around the Earth together",
        [
            "There is no gravity at all in space",
            "The station pushes them upward",
            "Their bodies become lighter than air",
        ],
    ),
    (
        "A circuit has one battery and two bulbs in series. What happens if one bulb breaks?",
        "The other bulb goes out",
        ["The other bulb gets twice as bright", "The battery charges faster", "Nothing changes"],
    ),
    (
        "Which trait is inherited rather than learned?",
        "Eye colour",
        ["Speaking French", "Riding a bicycle", "Writing an email"],
    ),
    (
        "Which best explains why a metal ship floats?",
        "Its shape displaces a weight of water equal to its own weight",
        ["Metal is lighter than water", "Water pulls metal upward", "Ships are full of helium"],
    ),
    ("What is 15 percent of 200?", "30", ["15", "20", "215"]),
    (
        "Two forces act on a box: 10 newtons to the left and 10 newtons to the right. What "
        "happens to a box at rest?",
        "It stays at rest",
        ["It moves left", "It moves right", "It spins quickly"],
    ),
    (
        "Why does a shadow become longer in the late afternoon?",
        "The Sun is lower in the sky",
        ["The object grows taller", "The Sun is closer to the Earth", "The Moon pushes it"],
    ),
    (
        "Which is the most likely result of cutting down a large forest?",
        "Less habitat for forest animals",
        ["More oxygen in the air at once", "More forest animals", "Colder summers everywhere"],
    ),
    ("How many seconds are there in 5 minutes?", "300", ["60", "500", "250"]),
    (
        "A liquid is heated and its temperature stops rising while it boils. Where does the "
        "energy go?",
        "Into changing the liquid into a gas",
        ["Into making the liquid heavier", "Nowhere, it disappears", "Into freezing the liquid"],
    ),
    (
        "Which pair of planets lies between the Earth and the Sun?",
        "Mercury and Venus",
        ["Mars and Jupiter", "Saturn and Uranus", "Venus and Mars"],
    ),
    (
        "A scientist repeats an experiment many times. Why?",
        "To check that the results are reliable",
        ["To make the results change", "To use more equipment", "To avoid writing notes"],
    ),
    (
        "A student shines white light through a prism. What does she see on the wall?",
        "A band of different colours",
        ["Only white light", "Only black", "The light disappears"],
    ),
]


def _arc(items: list, seed: int) -> list[dict]:
    """ARC schema: id, question, choices {text, label}, answerKey."""
    rng = random.Random(seed)
    rows = []
    for i, (q, right, wrong) in enumerate(items):
        text = [right, *wrong]
        rng.shuffle(text)
        labels = list(LETTERS[: len(text)])
        rows.append(
            {
                "id": f"q{i:03d}",
                "question": q,
                "choices": {"text": text, "label": labels},
                "answerKey": labels[text.index(right)],
            }
        )
    return rows


# ---------------------------------------------------------------- mini IFEval
END = "Is there anything else I can help with?"


def _if(prompt: str, ids: list[str], kwargs: list[dict], reference: str) -> dict:
    return {"prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs, "reference": reference}


def ifeval() -> list[dict]:
    """IFEval schema (key, prompt, instruction_id_list, kwargs) + a checked reference answer."""
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
    for i, row in enumerate(rows):
        row["key"] = 1000 + i
    return rows


def suites() -> dict[str, list[dict]]:
    """Every suite's items, by file stem."""
    return {
        "ifeval": ifeval(),
        "mmlu_stem": mmlu_stem(),
        "mmlu_pro": mmlu_pro(),
        "hellaswag": hellaswag(),
        "arc_easy": _arc(ARC_EASY, 4),
        "arc_challenge": _arc(ARC_CHALLENGE, 5),
    }


def render(rows: list[dict]) -> str:
    """JSONL text: sorted keys, one item per line."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def main(out: Path = OUT) -> None:
    """Write every suite's JSONL into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in suites().items():
        (out / f"{name}.jsonl").write_text(render(rows))
        print(f"{name}: {len(rows)} items")


if __name__ == "__main__":
    main()
