"""Regenerate README.md's ``## Benchmarks`` section from ``bench/results/latest.md``.

``python -m bench.readme_section`` (or ``python -m bench --update-readme``) replaces what
lies between ``<!-- bench:start -->`` and ``<!-- bench:end -->``. When the markers are
missing they are added: right under an existing ``## Benchmarks`` heading (what follows
the heading stays, after the end marker), else in a new section at the end.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import RESULTS_DIR

README = Path(__file__).resolve().parent.parent / "README.md"
START = "<!-- bench:start -->"
END = "<!-- bench:end -->"
HEADING = "## Benchmarks"
_HEADING_RE = re.compile(r"^## Benchmarks[ \t]*$", re.MULTILINE)


def with_markers(text: str) -> str:
    """``text`` with the markers present (added under the heading, or in a new section)."""
    if START in text and END in text:
        return text
    block = f"{START}\n{END}\n"
    match = _HEADING_RE.search(text)
    if match is None:
        return text.rstrip("\n") + f"\n\n{HEADING}\n\n{block}"
    head, tail = text[: match.end()], text[match.end() :].lstrip("\n")
    return f"{head}\n\n{block}" + (f"\n{tail}" if tail else "")


def section(latest_md: str) -> str:
    """The README's copy of ``latest.md``, with links made relative to the repository root."""
    body = latest_md.replace("](latency.png)", "](bench/results/latency.png)")
    note = (
        "<!-- generated from bench/results/latest.md by `make bench BENCH_ARGS=--update-readme`"
        " (or `python -m bench.readme_section`); do not edit by hand -->"
    )
    return f"{START}\n{note}\n\n{body.strip()}\n\n{END}"


def render(readme: str, latest_md: str) -> str:
    """``readme`` with the section between the markers replaced."""
    text = with_markers(readme)
    start = text.index(START)
    end = text.index(END, start) + len(END)
    return text[:start] + section(latest_md) + text[end:]


def update_readme(latest: Path = RESULTS_DIR / "latest.md", readme: Path = README) -> bool:
    """Rewrite ``readme``'s section from ``latest``; return whether the file changed."""
    old = readme.read_text()
    new = render(old, latest.read_text())
    if new != old:
        readme.write_text(new)
    return new != old


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latest", type=Path, default=RESULTS_DIR / "latest.md")
    parser.add_argument("--readme", type=Path, default=README)
    ns = parser.parse_args(argv)
    changed = update_readme(ns.latest, ns.readme)
    print(f"{ns.readme}: {'updated' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
