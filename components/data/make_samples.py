"""Regenerate the sample data shipped in this folder (deterministic; run from the repo root).

    python components/data/make_samples.py

`samples/dialogsum.jsonl` is a samsum-format task (``dialogue`` with CRLF line breaks,
``summary``) built from templates, so that a tiny model can learn it on a CPU in minutes:
the summary copies names, the activity, the place, the day and the time out of the dialogue.
`samples/preference.jsonl` is a preference set (``prompt``, ``chosen``, ``rejected``) over the
same dialogues: the chosen answer is the right summary; the rejected one a refusal, an answer
about something else, a summary with a wrong fact (a name, place, day or time the dialogue
does not have), or a summary that stops half way.
`corpus.txt` is the fixed text the ``tiny://`` tokenizers are trained on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = [
    "Anna",
    "Tom",
    "Maria",
    "John",
    "Lena",
    "Omar",
    "Sara",
    "Paul",
    "Ines",
    "Kenji",
    "Chloe",
    "Ivan",
    "Nora",
    "Leo",
    "Ruth",
    "Amir",
    "Zoe",
    "Hugo",
    "Mia",
    "Raj",
]
PLANS = [
    ("have lunch", "lunch"),
    ("have dinner", "dinner"),
    ("watch a movie", "the movie"),
    ("go running", "the run"),
    ("study", "the study session"),
    ("play tennis", "tennis"),
    ("have coffee", "coffee"),
    ("go shopping", "shopping"),
]
PLACES = [
    "the cafe",
    "the park",
    "the library",
    "the station",
    "the cinema",
    "the gym",
    "the Italian place",
    "the office",
    "the market",
    "the beach",
]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["9 am", "10 am", "11 am", "noon", "1 pm", "2 pm", "3 pm", "5 pm", "6 pm", "7 pm"]

TEMPLATES = [
    (
        [
            "{a}: Hi {b}, do you want to {plan} on {day}?",
            "{b}: Sure! Where?",
            "{a}: At {place}, at {time}.",
            "{b}: Perfect, see you there.",
        ],
        "{a} and {b} will {plan} at {place} on {day} at {time}.",
    ),
    (
        [
            "{a}: Are we still on for {noun} on {day}?",
            "{b}: Yes, but can we move it to {time}?",
            "{a}: No problem. Same place, {place}?",
            "{b}: Yes. See you!",
        ],
        "{a} and {b} will {plan} at {place} on {day} at {time}.",
    ),
    (
        [
            "{a}: I can't make it on {day}, sorry.",
            "{b}: Oh no. What about {noun}?",
            "{a}: Let's skip {noun} this week.",
            "{b}: OK, maybe next week then.",
        ],
        "{a} cancels {noun} with {b} on {day}.",
    ),
    (
        [
            "{a}: Where are you?",
            "{b}: Still at {place}.",
            "{a}: I'm waiting, we said {time}!",
            "{b}: Sorry, I'll be there in ten minutes.",
        ],
        "{b} is late; {a} is waiting and {b} is still at {place}.",
    ),
    (
        [
            "{a}: Did you bring the keys?",
            "{b}: No, I left them at {place}.",
            "{a}: Can you get them before {time}?",
            "{b}: Yes, I will.",
        ],
        "{b} left the keys at {place} and will get them before {time}.",
    ),
]


def make_dialogsum(n: int, seed: int = 1234) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns, summary = rng.choice(TEMPLATES)
        a, b = rng.sample(NAMES, 2)
        plan, noun = rng.choice(PLANS)
        slots = {
            "a": a,
            "b": b,
            "plan": plan,
            "noun": noun,
            "place": rng.choice(PLACES),
            "day": rng.choice(DAYS),
            "time": rng.choice(TIMES),
        }
        dialogue = "\r\n".join(t.format(**slots) for t in turns)
        rows.append({"dialogue": dialogue, "summary": summary.format(**slots)})
    return rows


SAMSUM_PROMPT = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
REFUSALS = [
    "I can't summarize this dialog.",
    "Sorry, I don't know.",
    "Summarize it yourself.",
    "This dialog is too long to read.",
]
OFF_TOPIC = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France.",
    "Hello! How can I help you today?",
    "0 1 2 3 4 5 6 7 8 9 10.",
]


def wrong_fact(summary: str, dialogue: str, rng: random.Random) -> str | None:
    """The summary with one name, place, day or time the dialogue does not have."""
    for values in rng.sample([NAMES, PLACES, DAYS, TIMES], 4):
        present = [v for v in values if v in summary]
        absent = [v for v in values if v not in dialogue]
        if present and absent:
            return summary.replace(rng.choice(present), rng.choice(absent))
    return None


def make_preference(n: int, seed: int = 4321) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for row in make_dialogsum(n, seed):
        dialogue = row["dialogue"].replace("\r\n", "\n")
        summary = row["summary"]
        kind = rng.randrange(4)
        rejected = None
        if kind == 2:
            rejected = wrong_fact(summary, dialogue, rng)
        if kind == 3:
            words = summary.split()
            rejected = " ".join(words[: max(2, len(words) // 3)])
        if rejected is None:
            rejected = rng.choice(REFUSALS if kind == 0 else OFF_TOPIC)
        prompt = SAMSUM_PROMPT.format(dialogue=dialogue)
        rows.append({"prompt": prompt, "chosen": summary, "rejected": rejected})
    return rows


def make_corpus(rows: list[dict[str, str]]) -> str:
    prose = (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n"
        "### Instruction:\n### Input:\n### Response:\nSummarize this dialog:\n---\nSummary:\n"
        "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 1000.\n"
        "Question: What is the capital of France? Answer: Paris is the capital of France.\n"
        "system user assistant: You are a helpful assistant. Hello! How can I help you today?\n"
    )
    text = [prose] + [r["dialogue"].replace("\r\n", "\n") + "\n" + r["summary"] for r in rows]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    rows = make_dialogsum(600)
    (HERE / "samples").mkdir(exist_ok=True)
    with open(HERE / "samples" / "dialogsum.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    with open(HERE / "samples" / "preference.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for row in make_preference(600):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (HERE / "corpus.txt").write_text(make_corpus(make_dialogsum(300, seed=99)), encoding="utf-8")
