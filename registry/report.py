"""Markdown report helpers shared by the commands that write `docs/results.md`."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, heading: str, section: str) -> None:
    """Replace the `## heading` section of a Markdown file with `section` (which starts
    with that heading), or append it; other sections are kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else "# Results\n\n"
    if heading in text:
        head, _, tail = text.partition(heading)
        rest = tail.split("\n## ", 1)
        text = head + section.rstrip("\n") + "\n" + ("\n## " + rest[1] if len(rest) > 1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
