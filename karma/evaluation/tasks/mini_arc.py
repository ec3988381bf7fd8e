"""Items of the mini ARC-Easy and ARC-Challenge suites: science questions."""

from __future__ import annotations

import random

from karma.evaluation.tasks.mini_mmlu import LETTERS

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


def arc_easy() -> list[dict]:
    """The mini ARC-Easy items."""
    return _arc(ARC_EASY, 4)


def arc_challenge() -> list[dict]:
    """The mini ARC-Challenge items."""
    return _arc(ARC_CHALLENGE, 5)
