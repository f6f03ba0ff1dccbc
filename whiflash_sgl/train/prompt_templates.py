"""Programmatically generated training prompts: math word problems, general chat, generic coding tasks.

Everything here is written for this project (no benchmark text). Each generator is an endless stream of
``(source, row)`` candidates drawn with the given ``random.Random``; the assembly in ``prompts.py`` stops it
once enough distinct prompts were accepted.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Callable, Iterator

Candidate = tuple[str, dict]

NAMES = (
    "Amara", "Ben", "Chloe", "Diego", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jamal", "Keiko", "Liam",
    "Maya", "Nikolai", "Olga", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wen", "Ximena",
    "Yusuf", "Zoe", "Arjun", "Beatriz", "Carlos", "Dana", "Emeka", "Fatima", "Gustav", "Hana", "Ivan", "Julia",
)


def user_row(row_id: str, category: str, text: str) -> dict:
    return {"id": row_id, "category": category, "messages": [{"role": "user", "content": text}]}


def _names(rng: random.Random, k: int) -> list[str]:
    return rng.sample(NAMES, k)


# --------------------------------------------------------------------------------------------- math

def _rate_travel(rng):
    n = _names(rng, 1)[0]
    unit = rng.choice(("miles", "kilometers"))
    v1, v2, h1, h2 = rng.randint(3, 14) * 5, rng.randint(3, 14) * 5, rng.randint(1, 5), rng.randint(1, 4)
    return (f"{n} drives at {v1} {unit} per hour for {h1} hours, then at {v2} {unit} per hour for {h2} more "
            f"hours. How many {unit} does {n} travel in total, and what is the average speed for the whole trip?")


def _rate_work(rng):
    a, b = _names(rng, 2)
    job = rng.choice(("paint a fence", "mow a lawn", "clean a warehouse", "sort a pile of mail", "tile a patio"))
    ta, tb = rng.choice(((2, 3), (3, 6), (4, 12), (6, 12), (5, 20), (10, 15), (12, 24), (6, 3), (8, 24)))
    return (f"{a} can {job} alone in {ta} hours, and {b} can do the same job alone in {tb} hours. "
            f"How long will it take them if they work together?")


def _rate_machine(rng):
    item = rng.choice(("bottles", "widgets", "loaves of bread", "pages", "bolts", "cupcakes"))
    r, m, h = rng.randint(2, 40), rng.choice((2, 3, 4, 5, 6, 10, 15)), rng.randint(2, 9)
    return (f"A machine produces {r} {item} every {m} minutes. Running without breaks, how many {item} "
            f"does it produce in {h} hours?")


def _ratio_groups(rng):
    place, a, b = rng.choice((("school club", "girls", "boys"), ("garden", "roses", "tulips"),
                              ("parking lot", "cars", "vans"), ("bag of marbles", "red marbles", "blue marbles"),
                              ("library shelf", "novels", "biographies")))
    p, q = rng.sample(range(1, 10), 2)
    total = (p + q) * rng.randint(2, 15)
    return f"In a {place}, the ratio of {a} to {b} is {p}:{q}. If there are {total} in total, how many {b} are there?"


def _ratio_recipe(rng):
    n = _names(rng, 1)[0]
    ing1, ing2 = rng.sample(("flour", "sugar", "milk", "oats", "rice", "water", "butter"), 2)
    x, y, k = rng.randint(1, 5), rng.randint(1, 5), rng.randint(2, 6)
    return (f"A recipe uses {x} cups of {ing1} for every {y} cups of {ing2}. {n} wants to use {x * k} cups of "
            f"{ing1}. How many cups of {ing2} should {n} use?")


def _percent_discount(rng):
    item = rng.choice(("jacket", "bicycle", "laptop", "pair of shoes", "desk lamp", "board game", "backpack"))
    price, off, tax = rng.randint(8, 60) * 5, rng.choice((10, 15, 20, 25, 30, 40, 50)), rng.choice((0, 5, 8, 10))
    tail = f" A sales tax of {tax}% is then added to the sale price." if tax else ""
    return f"A {item} normally costs ${price}. It is on sale for {off}% off.{tail} How much does it cost now?"


def _percent_change(rng):
    thing = rng.choice(("population of a town", "number of members in a club", "price of a train ticket",
                        "number of visitors to a museum"))
    start, pct = rng.randint(4, 90) * 50, rng.choice((4, 5, 10, 12, 15, 20, 25, 30))
    sign = rng.choice((1, -1))
    end = start + sign * start * pct // 100
    return f"The {thing} changed from {start} to {end}. By what percent did it change?"


def _percent_score(rng):
    n = _names(rng, 1)[0]
    total = rng.choice((20, 25, 40, 50, 80))
    right = rng.randint(total // 2, total)
    return f"{n} answered {right} out of {total} questions correctly on a test. What percentage did {n} get right?"


def _money_change(rng):
    n = _names(rng, 1)[0]
    (i1, p1), (i2, p2) = rng.sample((("notebooks", 3), ("pens", 2), ("apples", 1), ("sandwiches", 6),
                                     ("coffees", 4), ("candles", 7), ("magazines", 5)), 2)
    n1, n2 = rng.randint(2, 6), rng.randint(1, 5)
    total = n1 * p1 + n2 * p2
    bill = next(b for b in (20, 50, 100) if b > total)
    return (f"{n} buys {n1} {i1} at ${p1} each and {n2} {i2} at ${p2} each, and pays with a ${bill} bill. "
            f"How much change does {n} get?")


def _money_savings(rng):
    n = _names(rng, 1)[0]
    weekly, share = rng.randint(10, 60) * 10, rng.choice(("a quarter", "a third", "half", "10%", "20%"))
    goal = rng.randint(5, 40) * 100
    return f"{n} earns ${weekly} a week and saves {share} of it. How many weeks will it take {n} to save ${goal}?"


def _time_event(rng):
    event = rng.choice(("movie", "concert", "train journey", "football match", "lecture", "board meeting"))
    h, m, d = rng.randint(1, 11), rng.choice((0, 10, 15, 20, 30, 40, 45, 50)), rng.randint(40, 200)
    return f"A {event} starts at {h}:{m:02d} {rng.choice(('a.m.', 'p.m.'))} and lasts {d} minutes. When does it end?"


def _time_wages(rng):
    n = _names(rng, 1)[0]
    hours, days, rate, weeks = rng.randint(3, 9), rng.randint(2, 6), rng.randint(9, 35), rng.randint(2, 8)
    return (f"{n} works {hours} hours a day, {days} days a week, and earns ${rate} per hour. "
            f"How much does {n} earn in {weeks} weeks?")


def _ages_sum(rng):
    a, b = _names(rng, 2)
    young, gap = rng.randint(3, 40), rng.randint(2, 30)
    return f"{a} is {gap} years older than {b}. The sum of their ages is {2 * young + gap}. How old is {b}?"


def _ages_multiple(rng):
    a, b = _names(rng, 2)
    young, k, y = rng.randint(2, 15), rng.randint(2, 5), rng.randint(2, 10)
    total = (k + 1) * young + 2 * y
    return f"{a} is {k} times as old as {b}. In {y} years, the sum of their ages will be {total}. How old is {a} now?"


def _area_fence(rng):
    place = rng.choice(("garden", "playground", "parking area", "vegetable patch", "dog run", "courtyard"))
    unit = rng.choice(("meters", "feet", "yards"))
    l, w = rng.randint(5, 60), rng.randint(3, 40)
    return (f"A rectangular {place} is {l} {unit} long and {w} {unit} wide. What is its area, and how much "
            f"fencing is needed to go all the way around it?")


def _area_tiles(rng):
    s = rng.choice((20, 25, 30, 40, 50))
    l, w = s * rng.randint(8, 30), s * rng.randint(6, 20)
    return (f"A floor measures {l} cm by {w} cm. It is covered with square tiles that are {s} cm on each side. "
            f"How many tiles are needed?")


def _area_paint(rng):
    n = _names(rng, 1)[0]
    walls, l, h, cover = rng.randint(1, 4), rng.randint(3, 9), rng.randint(2, 4), rng.choice((5, 8, 10, 12))
    return (f"{n} wants to paint {walls} wall(s), each {l} m wide and {h} m high. One can of paint covers "
            f"{cover} square meters. How many cans does {n} need to buy?")


def _area_circle(rng):
    thing = rng.choice(("pond", "pizza", "table top", "fountain", "round rug"))
    return (f"A circular {thing} has a radius of {rng.randint(2, 30)} cm. Find its area and its circumference. "
            f"Use 3.14 for pi.")


def _algebra_linear(rng):
    a, x, b = rng.randint(2, 12), rng.randint(-15, 20), rng.randint(-30, 30)
    return f"Solve for x: {a}x {'+' if b >= 0 else '-'} {abs(b)} = {a * x + b}"


def _algebra_system(rng):
    x, y = rng.randint(-9, 9), rng.randint(-9, 9)
    a1, b1, a2, b2 = rng.randint(1, 6), rng.randint(1, 6), rng.randint(1, 6), -rng.randint(1, 6)
    return (f"Solve the system of equations: {a1}x + {b1}y = {a1 * x + b1 * y} and "
            f"{a2}x - {-b2}y = {a2 * x + b2 * y}.")


def _algebra_quadratic(rng):
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    s, p = -(r1 + r2), r1 * r2
    return f"Find all solutions of x^2 {'+' if s >= 0 else '-'} {abs(s)}x {'+' if p >= 0 else '-'} {abs(p)} = 0."


def _arith_expression(rng):
    a, b, c, d = (rng.randint(2, 99) for _ in range(4))
    return rng.choice((f"Compute {a * 7} × {b}.", f"What is {a} + {b} × {c} - {d}?",
                       f"Evaluate ({a} + {b}) × {c} - {d}.",
                       f"What is {rng.choice((5, 10, 15, 20, 25, 40, 75))}% of {a * 20}?",
                       f"What is {a * b} divided by {b}?", f"Calculate {a}^2 - {b}^2."))


def _arith_fractions(rng):
    (n1, d1), (n2, d2) = ((rng.randint(1, 9), rng.randint(2, 12)) for _ in range(2))
    op = rng.choice(("+", "-", "×", "÷"))
    return f"What is {n1}/{d1} {op} {n2}/{d2}? Give the answer as a fraction in lowest terms."


def _arith_average(rng):
    n = _names(rng, 1)[0]
    scores = [rng.randint(50, 100) for _ in range(rng.randint(3, 6))]
    return f"{n}'s quiz scores are {', '.join(map(str, scores))}. What is the average score?"


def _arith_units(rng):
    h, m = rng.randint(1, 9), rng.randint(1, 59)
    return rng.choice((f"How many seconds are there in {h} hours and {m} minutes?",
                       f"Convert {h * 1250} meters to kilometers.", f"How many minutes are in {h + 1} days?",
                       f"A jug holds {h} liters. How many 250 ml glasses can it fill?"))


MATH_TEMPLATES: dict[str, Callable[[random.Random], str]] = {
    "rate_travel": _rate_travel, "rate_work": _rate_work, "rate_machine": _rate_machine,
    "ratio_groups": _ratio_groups, "ratio_recipe": _ratio_recipe, "percent_discount": _percent_discount,
    "percent_change": _percent_change, "percent_score": _percent_score, "money_change": _money_change,
    "money_savings": _money_savings, "time_event": _time_event, "time_wages": _time_wages,
    "ages_sum": _ages_sum, "ages_multiple": _ages_multiple, "area_fence": _area_fence, "area_tiles": _area_tiles,
    "area_paint": _area_paint, "area_circle": _area_circle, "algebra_linear": _algebra_linear,
    "algebra_system": _algebra_system, "algebra_quadratic": _algebra_quadratic,
    "arith_expression": _arith_expression, "arith_fractions": _arith_fractions, "arith_average": _arith_average,
    "arith_units": _arith_units,
}
MATH_SUFFIXES = ("", " Show your work.", " Explain your reasoning step by step.", "\nLet's think step by step.",
                 " Give the final answer on its own line at the end.", " Answer briefly.")


def math_candidates(rng: random.Random, name: str) -> Iterator[Candidate]:
    """Endless questions from the math template ``name`` (a key of MATH_TEMPLATES)."""
    for i in itertools.count():
        text = MATH_TEMPLATES[name](rng) + rng.choice(MATH_SUFFIXES)
        yield f"math/{name}", user_row(f"math/{name}/{i}", "math", text)


# --------------------------------------------------------------------------------------------- chat

CHAT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "email": ("Write a {tone} email to {recipient} {purpose}.",
              "Draft a short email to {recipient} {purpose}. Keep it {length}.",
              "Help me write an email to {recipient} {purpose}. The tone should be {tone}."),
    "advice": ("What advice would you give to someone who {situation}?",
               "My friend {situation}. How can I support them?",
               "List {n} practical tips for someone who {situation}."),
    "explain": ("Explain {concept} to {audience}.", "What is {concept}? Explain it {style}.",
                "Why does {concept} matter? Give {audience} a clear explanation."),
    "story": ("Write a short story about {character} who {event}.",
              "Write a {story_length} {genre} story in which {character} {event}.",
              "Tell a bedtime story about {character} who {event}."),
    "compare": ("Compare {pair}. Which would you recommend for {purpose_short}?",
                "What are the main differences between {pair}?",
                "Make a table comparing {pair} for {purpose_short}."),
    "plan": ("Plan {plan} for {audience_plan}.", "Create a step-by-step plan for {plan}.",
             "Suggest {n} ideas for {plan}."),
    "creative": ("Write a {poem} about {topic}.", "Write a product description for {product}.",
                 "Write a social media post announcing {announcement}.", "Come up with {n} names for {product}."),
    "rewrite": ("Rewrite this sentence to sound more {tone}: \"{sentence}\"",
                "Make this message {length} and {tone}: \"{sentence}\""),
    "opinion": ("What are the pros and cons of {debate}?", "Give a balanced argument for and against {debate}.",
                "Is {debate} a good idea? Explain your view.",
                "Write a short persuasive paragraph in favour of {debate}.",
                "What might {audience} think about {debate}?"),
}
CHAT_SLOTS: dict[str, tuple[str, ...]] = {
    "tone": ("polite", "friendly", "formal", "persuasive", "apologetic", "enthusiastic", "concise", "warm"),
    "recipient": ("my landlord", "a new client", "my team", "a hiring manager", "my professor", "a neighbour",
                  "the customer support team", "an old colleague", "the event organisers", "my manager"),
    "purpose": ("asking to reschedule a meeting to next week", "about a late payment", "thanking them for their help",
                "requesting a deadline extension", "introducing a new project", "reporting a broken heater",
                "following up on a job application", "declining an invitation", "asking for a reference letter",
                "proposing a weekly check-in", "explaining a delay in shipping", "asking for feedback on a draft"),
    "length": ("short", "under 100 words", "brief", "to three sentences"),
    "situation": ("is starting a new job next week", "wants to learn to cook", "has trouble sleeping",
                  "is moving to a new city alone", "wants to run a first marathon", "is preparing for a job interview",
                  "feels overwhelmed by schoolwork", "wants to save money on groceries",
                  "is learning a second language",
                  "has to give a speech at a wedding", "wants to start a vegetable garden", "is adopting a dog",
                  "is returning to study after ten years", "wants to spend less time on their phone",
                  "is nervous about flying", "just got their first credit card", "is planning to change careers",
                  "keeps procrastinating on a big project", "is caring for an elderly parent",
                  "wants to make friends in a new town"),
    "n": ("three", "five", "seven", "ten"),
    "concept": ("compound interest", "photosynthesis", "inflation", "how vaccines work", "the greenhouse effect",
                "supply and demand", "black holes", "machine learning", "the water cycle", "plate tectonics",
                "how a bill becomes law", "encryption", "the immune system", "opportunity cost", "gravity",
                "how batteries store energy", "the placebo effect", "recursion"),
    "audience": ("a ten-year-old", "a high school student", "a busy executive", "my grandmother", "a beginner"),
    "style": ("in simple terms", "with an everyday analogy", "in three short paragraphs", "in one paragraph",
              "using a concrete example"),
    "character": ("a lighthouse keeper", "a curious robot", "a retired detective", "a young baker", "a lost kitten",
                  "an astronaut", "a shy dragon", "a street musician", "a time traveller", "a village librarian"),
    "event": ("finds a mysterious map", "has to save the town festival", "learns to trust a stranger",
              "wakes up in a different century", "loses something precious", "wins an unexpected prize",
              "must cross a frozen lake", "discovers a hidden talent"),
    "story_length": ("short", "very short", "300-word", "one-page", "two-paragraph"),
    "genre": ("funny", "mysterious", "heartwarming", "science fiction", "adventure", "spooky"),
    "pair": ("renting and buying a home", "electric cars and petrol cars", "tea and coffee", "cats and dogs as pets",
             "e-books and printed books", "trains and planes for a 500 km trip", "working from home and office work",
             "running and swimming for fitness", "a laptop and a tablet for students", "city life and country life",
             "public transport and cycling to work", "gas and induction stoves", "paper notebooks and note-taking apps",
             "group lessons and private tutoring", "a credit union and a big bank", "camping and staying in hotels"),
    "purpose_short": ("a young family", "a student on a budget", "someone who travels often", "a retiree",
                      "a small business owner", "someone living in a small flat"),
    "plan": ("a three-day trip to Lisbon", "a weekly meal plan on a budget", "a beginner workout routine",
             "a surprise birthday party", "a study schedule for final exams", "a team-building day",
             "a weekend camping trip", "a small community fundraiser", "a reading challenge for the year",
             "a garden makeover on a small budget", "a first week at a new job", "a day of sightseeing in Kyoto",
             "learning to play the guitar in three months", "a zero-waste kitchen", "a neighbourhood book swap"),
    "audience_plan": ("two adults", "a family with small children", "a group of friends", "a college student",
                      "a retired couple", "a solo traveller"),
    "poem": ("haiku", "short poem", "limerick", "sonnet", "free-verse poem"),
    "topic": ("autumn leaves", "the ocean at night", "a city waking up", "friendship", "the first snow",
              "an old bicycle", "coffee in the morning", "a thunderstorm", "a grandmother's kitchen",
              "the last day of summer", "a busy train station", "learning to swim", "a lighthouse in fog",
              "moving house"),
    "product": ("a reusable water bottle", "a smart desk lamp", "a handmade soap brand", "a hiking backpack",
                "a language-learning app", "a neighbourhood bakery", "a noise-cancelling headset"),
    "announcement": ("the opening of a new cafe", "a charity run next month", "a new podcast episode",
                     "a product launch", "the results of a community clean-up"),
    "sentence": ("we need the report asap", "cant make it tomorrow sorry", "your order is late because of us",
                 "pls send me the files", "the meeting is moved, again", "thanks for nothing"),
    "debate": ("a four-day work week", "banning cars from city centres", "homework for young children",
               "school uniforms", "remote work", "universal basic income", "social media for teenagers",
               "year-round schooling", "paying students for good grades", "tipping in restaurants",
               "self-checkout machines", "daylight saving time", "open-plan offices", "free public transport"),
}
_SLOT = re.compile(r"\{(\w+)\}")


def chat_candidates(rng: random.Random, kind: str) -> Iterator[Candidate]:
    """Endless requests of one kind (a key of CHAT_TEMPLATES); slots are filled independently at random."""
    for i in itertools.count():
        text = _SLOT.sub(lambda m: rng.choice(CHAT_SLOTS[m.group(1)]), rng.choice(CHAT_TEMPLATES[kind]))
        yield f"chat/{kind}", user_row(f"chat/{kind}/{i}", "chat", text)


# --------------------------------------------------------------------------------------------- coding tasks

CODE_TASKS = (
    "merge two sorted lists into a single sorted list", "compute a moving average over a window of size k",
    "group words that are anagrams of each other", "flatten a nested dictionary into dotted keys",
    "convert a Roman numeral to an integer", "check whether a string is a valid IPv4 address",
    "run-length encode a string", "split a list into chunks of size n", "compute the edit distance of two strings",
    "perform binary search on a sorted list", "topologically sort tasks given their dependencies",
    "parse durations like '1h30m15s' into seconds", "transpose a matrix given as a list of lists",
    "deep-merge two dictionaries", "rotate a square matrix by 90 degrees clockwise",
    "merge overlapping intervals", "evaluate an expression in reverse Polish notation",
    "find the shortest path in a weighted graph with Dijkstra's algorithm",
    "format a byte count as a human-readable size",
    "turn a title into a URL slug", "convert snake_case identifiers to camelCase",
    "count the ten most common words in a text file", "find all files with a given extension under a directory",
    "validate that a password has at least 8 characters, a digit and an uppercase letter",
    "read a CSV file and compute the total of one column", "return the k largest numbers from a stream",
    "compute the number of days between two dates given as strings", "detect a cycle in a linked list",
    "implement a min-heap without using heapq", "tokenize a simple arithmetic expression",
    "find the longest common prefix of a list of strings", "generate all subsets of a small set",
    "count islands in a grid of 0s and 1s", "serialize a binary tree to a list and back",
    "compute running totals of a list", "parse a query string into a dictionary",
    "retry a function call with exponential backoff", "time a block of code with a context manager",
    "cache the results of an expensive function with a size limit", "validate a simple email address with a regex",
)
CODE_TASK_TEMPLATES = ("Write a Python function to {task}.", "Show me how to {task} in Python.",
                       "Implement a function in {lang} to {task}.", "I need Python code to {task}. Can you write it?",
                       "Write a Python function to {task}. {modifier}", "How would you {task} in {lang}?")
CODE_LANGS = ("Python", "Python", "Python", "JavaScript", "Java", "TypeScript", "Go", "Rust")
CODE_MODIFIERS = ("Include type hints.", "Add a docstring and one usage example.", "Explain its time complexity.",
                  "Do not use any imports.", "Keep it short and readable.", "Include a few test cases.",
                  "Handle invalid input by raising ValueError.")
CODE_CONCEPT_QUESTIONS = (
    "What is the difference between a list and a tuple in Python?", "When should I use a generator instead of a list?",
    "Explain Python decorators with an example.", "How do context managers work in Python?",
    "What does the GIL mean for multithreaded Python programs?", "Explain *args and **kwargs with examples.",
    "How do I read a large file line by line in Python without loading it all into memory?",
    "What is the difference between `is` and `==` in Python?", "Explain list comprehensions with three examples.",
    "How do Python dataclasses differ from namedtuples?", "What is a virtual environment and why should I use one?",
    "How does exception chaining work in Python?", "Explain the difference between a process and a thread.",
    "What is dependency injection? Show a small Python example.", "How does `async`/`await` work in Python?",
)


def coding_task_candidates(rng: random.Random) -> Iterator[Candidate]:
    """Mostly "write a function" requests over CODE_TASKS, with a few conceptual coding questions mixed in."""
    for i in itertools.count():
        if rng.random() < 0.1:
            text = rng.choice(CODE_CONCEPT_QUESTIONS)
        else:
            text = rng.choice(CODE_TASK_TEMPLATES).format(
                task=rng.choice(CODE_TASKS), lang=rng.choice(CODE_LANGS), modifier=rng.choice(CODE_MODIFIERS))
        yield "code/tasks", user_row(f"code/tasks/{i}", "code", text)
