"""A seeded generator of multi-step arithmetic word problems with worked solutions.

The default run trains on these, so it needs no data files.  Each document is

    Question: <story with 2-4 steps of +, -, x on small integers>
    Answer: <one line per step, "a op b = c">
    #### <final number>

Same seed, same documents, on every machine (Python's ``random.Random``, no global state).
"""

from __future__ import annotations

import random

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonah",
         "Kira", "Liam", "Maya", "Noor", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
ITEMS = ["apples", "marbles", "stickers", "books", "coins", "pencils", "cookies", "stamps",
         "shells", "cards", "eggs", "flowers"]


def _step(rng: random.Random, name: str, item: str, total: int) -> tuple[str, str, int]:
    """One story sentence and its worked line, applied to the running ``total``."""
    kind = rng.choice(["buy", "give", "times", "find"] if total > 1 else ["buy", "times", "find"])
    if kind == "buy":
        n = rng.randint(2, 30)
        return (f"Then {name} buys {n} more {item}.", f"{total} + {n} = {total + n}", total + n)
    if kind == "find":
        n = rng.randint(2, 20)
        return (f"{name} finds {n} {item} on the way home.", f"{total} + {n} = {total + n}",
                total + n)
    if kind == "give":
        n = rng.randint(1, total - 1)
        friend = rng.choice([x for x in NAMES if x != name])
        return (f"{name} gives {n} {item} to {friend}.", f"{total} - {n} = {total - n}", total - n)
    n = rng.randint(2, 4)
    word = {2: "doubles", 3: "triples", 4: "quadruples"}[n]
    return (f"A friend {word} {name}'s {item}.", f"{total} x {n} = {total * n}", total * n)


def problem(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(2, 40)
    story, work = [f"{name} has {total} {item}."], []
    for _ in range(rng.randint(2, 4)):
        sentence, line, total = _step(rng, name, item, total)
        story.append(sentence)
        work.append(line)
    story.append(f"How many {item} does {name} have now?")
    return ("Question: " + " ".join(story) + "\nAnswer: " + "\n".join(work)
            + f"\n#### {total}")


def documents(num: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [problem(rng) for _ in range(num)]
