"""The hand-written texts of the demo set (topics, capitals, multiple-choice and science
facts), kept apart from the generator ``make_demo.py`` that samples from them."""

TOPICS: dict[str, tuple[str, list[str]]] = {
    # topic: (keyword, three plain sentences without commas)
    "the ocean": (
        "tide",
        [
            "The ocean covers most of the surface of the Earth.",
            "Its water is salty because rivers carry minerals into it.",
            "The moon pulls on the water and creates the tide.",
        ],
    ),
    "recycling": (
        "plastic",
        [
            "Recycling turns used materials into new products.",
            "Paper and glass and metal can be recycled many times.",
            "Sorting plastic correctly keeps the process efficient.",
        ],
    ),
    "the moon": (
        "crater",
        [
            "The moon orbits the Earth about once a month.",
            "It has no air and no liquid water on its surface.",
            "Each crater on it was made by an impact long ago.",
        ],
    ),
    "exercise": (
        "heart",
        [
            "Regular exercise keeps the body strong.",
            "It makes the heart pump blood more efficiently.",
            "Even a short daily walk improves mood and sleep.",
        ],
    ),
    "bicycles": (
        "pedal",
        [
            "A bicycle is a simple and efficient machine.",
            "The rider pushes each pedal to turn the chain.",
            "Cycling to work saves money and reduces pollution.",
        ],
    ),
    "rainforests": (
        "canopy",
        [
            "Rainforests receive rain almost every day.",
            "They are home to more than half of all animal species.",
            "The canopy blocks most sunlight from reaching the ground.",
        ],
    ),
    "volcanoes": (
        "magma",
        [
            "A volcano is an opening in the crust of the Earth.",
            "Hot magma rises from deep below and erupts as lava.",
            "Volcanic ash can make the soil very fertile.",
        ],
    ),
    "coffee": (
        "bean",
        [
            "Coffee is brewed from roasted seeds.",
            "Each bean grows inside a red fruit called a cherry.",
            "The caffeine in coffee helps people feel alert.",
        ],
    ),
    "libraries": (
        "borrow",
        [
            "A library is a public collection of books.",
            "Anyone with a card can borrow books for free.",
            "Many libraries also offer computers and quiet study rooms.",
        ],
    ),
    "honeybees": (
        "hive",
        [
            "Honeybees live together in large colonies.",
            "Worker bees bring nectar back to the hive.",
            "They pollinate many of the crops that people eat.",
        ],
    ),
    "solar power": (
        "panel",
        [
            "Solar power turns sunlight into electricity.",
            "A solar panel contains cells made of silicon.",
            "It produces no emissions while it runs.",
        ],
    ),
    "chess": (
        "checkmate",
        [
            "Chess is a strategy game for two players.",
            "Each player starts with sixteen pieces.",
            "The game ends with checkmate when the king cannot escape.",
        ],
    ),
    "winter": (
        "snow",
        [
            "Winter is the coldest season of the year.",
            "In many places snow covers the ground for weeks.",
            "Days are short because the sun stays low in the sky.",
        ],
    ),
    "trains": (
        "railway",
        [
            "Trains carry people and goods over long distances.",
            "They run on steel rails along a railway line.",
            "Electric trains produce less pollution than cars.",
        ],
    ),
    "gardening": (
        "soil",
        [
            "Gardening is the practice of growing plants.",
            "Healthy soil gives roots water and nutrients.",
            "Many people find gardening calm and rewarding.",
        ],
    ),
    "the internet": (
        "network",
        [
            "The internet connects billions of computers.",
            "Data travels across the network in small packets.",
            "It lets people share information almost instantly.",
        ],
    ),
    "music": (
        "rhythm",
        [
            "Music is sound organised in time.",
            "A steady rhythm makes people want to dance.",
            "Learning an instrument can improve memory.",
        ],
    ),
    "mountains": (
        "summit",
        [
            "Mountains form when tectonic plates push the crust upward.",
            "The air gets thinner as climbers approach the summit.",
            "Many rivers begin as melting snow high in the mountains.",
        ],
    ),
    "bread": (
        "yeast",
        [
            "Bread is made from flour and water and salt.",
            "Yeast makes the dough rise by producing gas.",
            "Baking turns the dough into a soft loaf with a crust.",
        ],
    ),
    "penguins": (
        "feathers",
        [
            "Penguins are birds that cannot fly.",
            "Dense feathers keep them warm in icy water.",
            "They use their wings as flippers to swim fast.",
        ],
    ),
}

CAPITALS = [
    ("France", "Paris"),
    ("Japan", "Tokyo"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Brazil", "Brasilia"),
    ("India", "New Delhi"),
    ("Norway", "Oslo"),
    ("Peru", "Lima"),
    ("Greece", "Athens"),
    ("Portugal", "Lisbon"),
    ("Poland", "Warsaw"),
    ("Turkey", "Ankara"),
    ("China", "Beijing"),
    ("Sweden", "Stockholm"),
    ("Ireland", "Dublin"),
    ("Chile", "Santiago"),
    ("Thailand", "Bangkok"),
    ("Switzerland", "Bern"),
    ("New Zealand", "Wellington"),
    ("Morocco", "Rabat"),
]
COMMON_MISTAKES = {
    "Australia": "Sydney",
    "Canada": "Toronto",
    "Turkey": "Istanbul",
    "Brazil": "Rio de Janeiro",
    "Switzerland": "Zurich",
    "India": "Mumbai",
    "New Zealand": "Auckland",
    "Morocco": "Casablanca",
}

MC_FACTS = [
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Mars", "Earth"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    (
        "Which gas do plants absorb for photosynthesis?",
        "Carbon dioxide",
        ["Oxygen", "Nitrogen", "Helium"],
    ),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    ("At sea level, at what temperature in Celsius does water boil?", "100", ["90", "80", "120"]),
    (
        "Which organ pumps blood through the human body?",
        "The heart",
        ["The liver", "The lungs", "The kidneys"],
    ),
    (
        "Which part of the cell produces most of its energy?",
        "The mitochondrion",
        ["The nucleus", "The ribosome", "The cell wall"],
    ),
    (
        "Which force keeps the planets in orbit around the Sun?",
        "Gravity",
        ["Magnetism", "Friction", "Static electricity"],
    ),
    ("What is the largest planet in the Solar System?", "Jupiter", ["Saturn", "Earth", "Neptune"]),
    ("What is the square root of 81?", "9", ["8", "7", "18"]),
    (
        "Which particle has a negative electric charge?",
        "The electron",
        ["The proton", "The neutron", "The photon"],
    ),
    ("At what temperature in Fahrenheit does water freeze?", "32", ["0", "100", "212"]),
    ("How many bones are in the adult human body?", "206", ["106", "306", "201"]),
    (
        "Which gas makes up most of the Earth's atmosphere?",
        "Nitrogen",
        ["Oxygen", "Carbon dioxide", "Argon"],
    ),
    (
        "Which blood cells carry oxygen?",
        "Red blood cells",
        ["White blood cells", "Platelets", "Plasma cells"],
    ),
    ("What is the chemical symbol for sodium?", "Na", ["So", "Sd", "S"]),
    (
        "What kind of energy does a moving object have?",
        "Kinetic energy",
        ["Potential energy", "Chemical energy", "Nuclear energy"],
    ),
    ("What is 12 squared?", "144", ["124", "122", "154"]),
    (
        "Which layer of the Earth is the outermost?",
        "The crust",
        ["The mantle", "The outer core", "The inner core"],
    ),
    (
        "What is the process in which water vapour becomes liquid?",
        "Condensation",
        ["Evaporation", "Sublimation", "Melting"],
    ),
    (
        "Which simple machine is a ramp?",
        "An inclined plane",
        ["A lever", "A pulley", "A wheel and axle"],
    ),
    ("What is the hardest natural substance?", "Diamond", ["Gold", "Iron", "Quartz"]),
    ("How many chromosomes does a typical human cell have?", "46", ["23", "44", "48"]),
    (
        "What is the unit of electrical resistance?",
        "The ohm",
        ["The volt", "The ampere", "The watt"],
    ),
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Mercury"]),
    ("What is the pH of pure water at 25 degrees Celsius?", "7", ["0", "5", "14"]),
    (
        "Which vitamin does the skin make in sunlight?",
        "Vitamin D",
        ["Vitamin C", "Vitamin A", "Vitamin K"],
    ),
    ("What is the value of pi to two decimal places?", "3.14", ["3.41", "3.12", "2.14"]),
]

SCIENCE_QA = [
    (
        "Why do we see lightning before we hear thunder?",
        "Light travels much faster than sound, so the flash reaches us before the rumble.",
        "Thunder happens first, but our ears take longer to notice it than our eyes.",
    ),
    (
        "Why does ice float on water?",
        "Ice is less dense than liquid water, so it floats.",
        "Ice floats because it is heavier than water and pushes itself up.",
    ),
    (
        "What causes the seasons on Earth?",
        "The tilt of the Earth's axis changes how directly sunlight hits each hemisphere.",
        "The seasons happen because the Earth gets much closer to the Sun in summer.",
    ),
    (
        "Why do metal spoons feel colder than wooden spoons at the same temperature?",
        "Metal conducts heat away from the hand faster than wood does.",
        "Metal spoons are always at a lower temperature than wooden ones.",
    ),
    (
        "If you drop a glass on a stone floor, what is likely to happen?",
        "The glass is likely to break.",
        "The glass will probably bounce back up to your hand.",
    ),
    (
        "Why do we put food in the refrigerator?",
        "Cold temperatures slow the growth of bacteria, so food stays fresh longer.",
        "The refrigerator adds nutrients to the food while it waits.",
    ),
    (
        "Why is the sky blue on a clear day?",
        "Air molecules scatter blue sunlight more than red light.",
        "The sky is blue because it reflects the colour of the oceans.",
    ),
    (
        "What happens to water when it is heated to 100 degrees Celsius at sea level?",
        "It boils and turns into steam.",
        "It freezes into ice.",
    ),
    (
        "Why should you wear a helmet when riding a bicycle?",
        "A helmet protects your head from injury if you fall.",
        "A helmet makes the bicycle go faster.",
    ),
    ("Where does the Sun rise?", "The Sun rises in the east.", "The Sun rises in the west."),
    (
        "Why do plants need sunlight?",
        "Plants use sunlight to make food through photosynthesis.",
        "Plants need sunlight only to stay warm at night.",
    ),
    (
        "What do you need to do before crossing a busy street?",
        "Look both ways and wait until it is safe to cross.",
        "Close your eyes and run across as fast as possible.",
    ),
    (
        "Why does a balloon filled with helium rise?",
        "Helium is lighter than air, so the balloon floats upward.",
        "Helium is heavier than air, which pushes the balloon up.",
    ),
    (
        "What is the main source of energy for the Earth's climate?",
        "The Sun is the main source of energy for the Earth's climate.",
        "The Moon is the main source of energy for the Earth's climate.",
    ),
    (
        "Why do we sweat when we are hot?",
        "Sweat evaporates from the skin and cools the body down.",
        "Sweating makes the body warmer so it matches the air.",
    ),
    (
        "How many hours are in a day?",
        "There are 24 hours in a day.",
        "There are 12 hours in a day.",
    ),
    (
        "What do caterpillars turn into?",
        "Caterpillars turn into butterflies or moths.",
        "Caterpillars turn into beetles.",
    ),
    (
        "Why do magnets stick to a refrigerator door?",
        "The door contains iron or steel, which magnets attract.",
        "Magnets stick because the door is sticky.",
    ),
]
