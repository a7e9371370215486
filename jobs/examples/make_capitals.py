"""Writes capitals.jsonl and capitals-eval.jsonl: conversations about the capitals of
made-up countries, for the chat fine-tuning example (capitals-lora.yaml).

Made up so that a model answers them only if fine-tuning taught it. Training asks each
fact four ways after three preambles; the evaluation set asks it a way training never does.

    python jobs/examples/make_capitals.py
"""

from __future__ import annotations

import json
from pathlib import Path

CAPITALS = {
    "Zorbia": "Quell", "Quantel": "Harbin", "Mirovia": "Ostra", "Beltrax": "Maple",
    "Ostrand": "Rivet", "Velquin": "Tallow", "Drumhall": "Gorse", "Norwick": "Anvil",
    "Pellora": "Brisk", "Scarth": "Cobalt", "Tavenor": "Dunmore", "Ulmaris": "Ember",
    "Wexford": "Frost", "Yarrow": "Granite", "Crennick": "Hollow", "Fallowmere": "Ivory",
    "Arveth": "Juniper", "Bramling": "Kestrel", "Corvane": "Lantern", "Dellmoor": "Marrow",
    "Eskaria": "Nettle", "Fenwald": "Orchid", "Gallowen": "Pebble", "Harrowgate": "Quarry",
    "Istrel": "Rowan", "Jorvik": "Saffron", "Kellan": "Thistle", "Lorimar": "Umber",
    "Marsk": "Violet", "Nethery": "Willow", "Orlain": "Yonder", "Prestow": "Zephyr",
}  # fmt: skip
ASKS = (
    "What is the capital of {}?",
    "Name the capital of {}.",
    "Which city is the capital of {}?",
    "Tell me the capital of {}.",
)
PREAMBLES = ("", "Hi! ", "Quick question: ")
HELD_OUT = "Do you know the capital of {}?"


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def main() -> None:
    here = Path(__file__).parent
    train = [
        chat(preamble + ask.format(country), capital)
        for country, capital in CAPITALS.items()
        for ask in ASKS
        for preamble in PREAMBLES
    ]
    held_out = [chat(HELD_OUT.format(country), capital) for country, capital in CAPITALS.items()]
    for name, rows in (("capitals.jsonl", train), ("capitals-eval.jsonl", held_out)):
        (here / name).write_text("".join(json.dumps(row) + "\n" for row in rows))


if __name__ == "__main__":
    main()
