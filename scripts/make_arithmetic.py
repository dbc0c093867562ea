"""Write the `arithmetic` preset's prompt files: integer problems whose difficulty is spread on purpose.

    python scripts/make_arithmetic.py                      # the shipped files (seed 2026)
    python scripts/make_arithmetic.py --train 200 --val 64 --out-dir my_data   # a bigger set

Each row is ``{"prompt": "What is 47 + 38? Answer with just the number.", "answer": 85, "level":
"add2"}``; the `level` field is what ``data.group_field: level`` reports validation by. The levels
and how often SmolLM2-135M-Instruct answers them greedily before any training are in
docs/learning.md; the mix was chosen from that measurement so the overall pass rate is low while the
levels differ a lot (some nearly solved, some hopeless), which is where rejection sampling's choices
matter. The same seed always gives the same files; no problem appears twice across the splits.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRESETS = Path(__file__).resolve().parent.parent / "thresher" / "presets"
TEMPLATE = "What is {a} {op} {b}? Answer with just the number."

# level -> (operator, every operand pair of the level); subtractions keep a non-negative answer
LEVELS: dict[str, tuple[str, list[tuple[int, int]]]] = {
    "add1": ("+", [(a, b) for a in range(1, 10) for b in range(1, 10)]),
    "sub1": ("-", [(a, b) for a in range(2, 19) for b in range(1, 10) if a > b]),
    "mul1": ("*", [(a, b) for a in range(2, 10) for b in range(2, 10)]),
    "add2": ("+", [(a, b) for a in range(10, 100) for b in range(10, 100)]),
    "sub2": ("-", [(a, b) for a in range(10, 100) for b in range(10, 100) if a > b]),
    "mul2": ("*", [(a, b) for a in range(10, 100) for b in range(2, 10)]),
}


def answer(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def split_level(level: str, val: int, train: int, rng: random.Random) -> tuple[list[dict], list[dict]]:
    """``val`` held-out and ``train`` training problems of ``level``, all distinct."""
    op, pairs = LEVELS[level]
    if val + train > len(pairs):
        raise SystemExit(f"level {level}: {len(pairs)} distinct problems, {val} + {train} asked; ask for fewer")
    chosen = list(pairs)
    rng.shuffle(chosen)  # a whole shuffle, then slices: more training problems never change the held-out ones
    chosen = chosen[: val + train]
    rows = [{"prompt": TEMPLATE.format(a=a, op=op, b=b), "answer": answer(op, a, b), "level": level} for a, b in chosen]
    return rows[:val], rows[val:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--levels", default=",".join(LEVELS), help="Comma-separated levels to include.")
    parser.add_argument("--train", type=int, default=40, help="Training prompts per level.")
    parser.add_argument("--val", type=int, default=24, help="Held-out prompts per level (balanced).")
    parser.add_argument("--out-dir", type=Path, default=PRESETS)
    parser.add_argument("--name", default="arithmetic", help="Files are NAME_train.jsonl and NAME_val.jsonl.")
    args = parser.parse_args()
    levels = [name.strip() for name in args.levels.split(",") if name.strip()]
    unknown = sorted(set(levels) - set(LEVELS))
    if unknown:
        raise SystemExit(f"--levels: unknown {', '.join(unknown)}; known: {', '.join(LEVELS)}")
    rng = random.Random(args.seed)
    held_out: list[list[dict]] = []
    train: list[dict] = []
    for level in levels:  # one level's draw never depends on another's counts
        level_val, level_train = split_level(level, args.val, args.train, random.Random(f"{args.seed}:{level}"))
        held_out.append(level_val)
        train += level_train
    # Held-out prompts take turns by level, so the first k of them (rs.val_max_prompts) stay balanced.
    val = [row for turn in zip(*held_out, strict=True) for row in turn]
    rng.shuffle(train)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("val", val)):
        path = args.out_dir / f"{args.name}_{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        print(f"wrote {path}: {len(rows)} prompts over {len(levels)} levels")


if __name__ == "__main__":
    main()
