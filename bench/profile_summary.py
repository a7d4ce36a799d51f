"""Summarise py-spy's collapsed stacks (`py-spy record --format raw`): where a process spent its samples.

    .venv/bin/python bench/profile_summary.py PROFILE.txt [--top 40] [--match services/]

Prints the functions with the most samples on the stack (inclusive) and at the top of it (self),
as shares of all samples, so two profiles of the same path can be compared line by line.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def load(path: Path) -> tuple[Counter[str], Counter[str], int]:
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    return inclusive, own, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="only frames whose text contains this")
    args = parser.parse_args()
    inclusive, own, total = load(args.profile)
    print(f"{total} samples")
    for title, counter in (("inclusive", inclusive), ("self", own)):
        print(f"\n{title}:")
        shown = [(frame, n) for frame, n in counter.most_common() if args.match in frame][: args.top]
        for frame, n in shown:
            print(f"{100 * n / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
