#!/usr/bin/env python3
"""Build the shipped zero-shot task `tinystories_next` (src/crossblock/eval/task_data/): pick the true
next sentence of a TinyStories paragraph among 4: itself, itself with two words swapped (twice,
at other places) and the sentence at the same position in another paragraph. Source: $CROSSBLOCK_SHARED/data/tinystories/valid.txt (the TinyStories
validation text, see its SOURCE.md), its last paragraphs; deterministic (seed 0).

    python bench/make_tinystories_next.py [--items 400]
"""
import argparse
import json
import random
import re

from common import ROOT, SHARED

SENTENCE = re.compile(r'(?<=[.!?])"?\s+(?=[A-Z"])')


def sentences(paragraph: str) -> list[str]:
    out = [s.strip() for s in SENTENCE.split(paragraph) if s.strip()]
    return [s for s in out if 3 <= len(s.split()) <= 30]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=300)
    p.add_argument("--choices", type=int, default=4)
    args = p.parse_args()
    text = (SHARED / "data" / "tinystories" / "valid.txt").read_text()
    paragraphs = [sentences(x) for x in text.split("\n\n")]
    paragraphs = [x for x in paragraphs if len(x) >= 3][::-1]  # from the end of the file
    rng = random.Random(0)
    items = []
    for i, para in enumerate(paragraphs):
        if len(items) == args.items:
            break
        pos = min(len(para) - 1, 2)  # two sentences of context (or all but the last)
        answer = para[pos]
        words = answer.split()
        if len(words) < 4:
            continue
        swaps = set()
        while len(swaps) < args.choices - 2:  # the sentence with two of its words swapped
            a, b = sorted(rng.sample(range(len(words)), 2))
            swapped = words[:a] + [words[b]] + words[a + 1:b] + [words[a]] + words[b + 1:]
            if swapped != words:
                swaps.add(" ".join(swapped))
        pool = [q[pos] for q in paragraphs if q is not para and len(q) > pos and q[pos] != answer]
        choices = sorted(swaps) + [rng.choice(pool)]  # and another paragraph's sentence
        rng.shuffle(choices)
        label = rng.randrange(args.choices)
        choices.insert(label, answer)
        items.append({"id": i, "context": " ".join(para[:pos]), "choices": choices, "label": label})
    out = ROOT / "src" / "crossblock" / "eval" / "task_data" / "tinystories_next.jsonl"
    out.write_text("".join(json.dumps(x) + "\n" for x in items))
    print(f"wrote {out}: {len(items)} items")


if __name__ == "__main__":
    main()
