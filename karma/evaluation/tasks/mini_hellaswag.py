"""Items of the mini HellaSwag suite: everyday contexts with one sensible ending."""

from __future__ import annotations

import random

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
