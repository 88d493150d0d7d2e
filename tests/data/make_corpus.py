"""Writes tests/data/corpus.txt: simple English text generated from templates, nothing downloaded.

The corpus trains the byte-level BPE tokenizers of the test checkpoints and the embedded demo model,
and is the demo model's whole pre-training set. It mixes short stories, plain facts, arithmetic and
question/answer pairs ("Q: ...\\nA: ..."), one document per paragraph. The output is a function of
the seed alone, so re-running this script reproduces the committed file byte for byte.

    python3 tests/data/make_corpus.py
"""

from __future__ import annotations

import random
from pathlib import Path

# fmt: off
NAMES = ["Mia", "Tom", "Ana", "Ben", "Lily", "Sam", "Max", "Zoe", "Leo", "Nora", "Eli", "Ruby",
         "Omar", "Ivy", "Jack", "Rosa", "Finn", "Maya", "Theo", "Lucy"]
ADJECTIVES = ["little", "brave", "happy", "curious", "sleepy", "kind", "shy", "clever", "small",
              "gentle", "quick", "funny"]
PLACES = ["forest", "garden", "village", "river", "hill", "farm", "park", "beach", "town",
          "library", "kitchen", "meadow"]
OBJECTS = ["ball", "kite", "book", "hat", "box", "cake", "lamp", "boat", "key", "map", "drum",
           "shell", "cup", "sock"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "brown", "white", "black"]
TIMES = ["One morning", "One sunny day", "Long ago", "Last summer", "On a rainy day",
         "One cold night", "Early one spring", "After lunch one day"]
FRIENDS = ["a friendly dog", "an old owl", "a tiny mouse", "a wise turtle", "a singing bird",
           "a busy bee", "a tall giraffe", "a young rabbit"]
# fmt: on
# animal: (sound, legs, home, food, ability)
ANIMALS = {
    "dog": ("woof", 4, "a house", "bones", "run fast"),
    "cat": ("meow", 4, "a house", "fish", "climb trees"),
    "cow": ("moo", 4, "a farm", "grass", "make milk"),
    "duck": ("quack", 2, "a pond", "seeds", "swim"),
    "bird": ("tweet", 2, "a nest", "worms", "fly"),
    "frog": ("ribbit", 4, "a pond", "flies", "jump far"),
    "sheep": ("baa", 4, "a farm", "grass", "grow wool"),
    "owl": ("hoot", 2, "a tree", "mice", "see at night"),
    "horse": ("neigh", 4, "a stable", "hay", "gallop"),
    "bee": ("buzz", 6, "a hive", "nectar", "make honey"),
}
THINGS = {
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "the sun": "yellow",
    "a banana": "yellow",
    "an apple": "red",
    "coal": "black",
    "a carrot": "orange",
    "chocolate": "brown",
    "a lemon": "yellow",
    "the sea": "blue",
    "a cherry": "red",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
# fmt: off
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
         "eleven", "twelve"]
# fmt: on


def with_article(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def story(r: random.Random) -> str:
    name, adj, place = r.choice(NAMES), r.choice(ADJECTIVES), r.choice(PLACES)
    obj = r.choice(OBJECTS)
    color, friend = r.choice(COLORS), r.choice(FRIENDS)
    animal = r.choice(list(ANIMALS))
    opening = r.choice(
        [
            f"{r.choice(TIMES)}, a {adj} {animal} named {name} lived near the {place}.",
            f"{r.choice(TIMES)}, {name} went to the {place} with a {color} {obj}.",
            f"There was once a {adj} child called {name} who loved the {place}.",
            f"{name} was a {adj} {animal}. Every day, {name} played in the {place}.",
        ]
    )
    problem = r.choice(
        [
            f"One day, {name} lost the {color} {obj} and felt {r.choice(['sad', 'worried'])}.",
            f"But the wind blew the {obj} far away, over the {place}.",
            f"Then it began to rain, and {name} could not find the way home.",
            f"{name} wanted to share the {obj}, but nobody was there to play.",
            f"Suddenly, {name} heard a strange noise behind the {obj}.",
        ]
    )
    middle = r.choice(
        [
            f"{name} asked {friend} for help.",
            f"Soon {friend} came by and said hello.",
            f"{name} looked under every rock and behind every tree.",
            f"{name} took a deep breath and tried again.",
        ]
    )
    ending = r.choice(
        [
            f"Together they found the {obj}, and {name} smiled.",
            f"In the end, {name} was {r.choice(['happy', 'glad'])} and went home for dinner.",
            f"From that day on, {name} and the {friend.split(' ', 1)[1]} were best friends.",
            f"{name} learned that it is good to ask for help.",
            f"The {obj} was safe, and the {place} was quiet again.",
        ]
    )
    moral = r.choice(["", "", f' {name} said, "Thank you!"', " The end."])
    return f"{opening} {problem} {middle} {ending}{moral}"


def facts(r: random.Random) -> str:
    animal = r.choice(list(ANIMALS))
    sound, legs, home, food, ability = ANIMALS[animal]
    one = with_article(animal)
    subject = one.capitalize()
    thing = r.choice(list(THINGS))
    day = r.randrange(7)
    season = r.randrange(4)
    lines = [
        f"{subject} says {sound}.",
        f"{subject} has {WORDS[legs]} legs.",
        f"{subject} lives in {home} and eats {food}.",
        f"{subject} can {ability}.",
        f"The color of {thing} is {THINGS[thing]}.",
        f"After {DAYS[day]} comes {DAYS[(day + 1) % 7]}.",
        f"After {SEASONS[season]} comes {SEASONS[(season + 1) % 4]}.",
    ]
    r.shuffle(lines)
    return " ".join(lines[: r.randint(3, 5)])


def arithmetic(r: random.Random) -> str:
    out = []
    for _ in range(r.randint(3, 6)):
        a, b = r.randint(0, 12), r.randint(0, 12)
        op = r.choice(["plus", "minus", "times"])
        if op == "minus" and b > a:
            a, b = b, a
        value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
        out.append(f"{a} {op} {b} is {value}.")
    return " ".join(out)


def question(r: random.Random) -> str:
    animal = r.choice(list(ANIMALS))
    sound, legs, home, food, ability = ANIMALS[animal]
    one = with_article(animal)
    subject = one.capitalize()
    thing = r.choice(list(THINGS))
    day = r.randrange(7)
    a, b = r.randint(0, 12), r.randint(0, 12)
    name, obj, color = r.choice(NAMES), r.choice(OBJECTS), r.choice(COLORS)
    q, answer = r.choice(
        [
            (f"What sound does {one} make?", f"{subject} says {sound}."),
            (f"How many legs does {one} have?", f"{subject} has {WORDS[legs]} legs."),
            (f"Where does {one} live?", f"{subject} lives in {home}."),
            (f"What does {one} eat?", f"{subject} eats {food}."),
            (f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {THINGS[thing]}."),
            (f"What comes after {DAYS[day]}?", f"{DAYS[(day + 1) % 7]} comes after {DAYS[day]}."),
            (f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."),
            (f"What is {a} times {b}?", f"{a} times {b} is {a * b}."),
            (
                f"Can you tell me a story about {name}?",
                f"{name} had a {color} {obj}. {name} took it to the park and played all day.",
            ),
            ("Hello, who are you?", "Hello! I am a tiny demo model. I know a few simple facts."),
        ]
    )
    return f"Q: {q}\nA: {answer}"


def corpus(seed: int = 0, n_docs: int = 1400) -> str:
    r = random.Random(seed)
    kinds = [story] * 6 + [facts] * 2 + [arithmetic] + [question] * 3
    return "\n\n".join(r.choice(kinds)(r) for _ in range(n_docs)) + "\n"


if __name__ == "__main__":
    path = Path(__file__).with_name("corpus.txt")
    path.write_text(corpus(), encoding="utf-8")
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
