"""Print the requirements of this project's extras, one a line, read from pyproject.toml.

The images install these (with constraints.txt) in a layer of their own before the source is
copied in, so a change to the source does not reinstall the dependencies:

    python3 docker/requirements.py pyproject.toml serve | pip install -c constraints.txt -r /dev/stdin

The project's own dependencies come first; an extra that names another of this project's
extras (`edge-anomaly[serve]`) brings that one's requirements instead. Standard library only:
it runs on the bare base image.
"""

from __future__ import annotations

import re
import sys
import tomllib


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies of `project` (pyproject's `[project]` table) plus those of
    `extras`, self-references expanded, duplicates dropped, in order."""
    own = _normalized(project["name"])
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen_extras: set[str] = set()

    def add(reqs: list[str]) -> None:
        for req in reqs:
            match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*\[([^\]]+)\]\s*", req)
            if match and _normalized(match.group(1)) == own:
                for extra in match.group(2).split(","):
                    add_extra(extra.strip())
            elif req not in out:
                out.append(req)

    def add_extra(extra: str) -> None:
        if extra in seen_extras:
            return
        if extra not in optional:
            known = ", ".join(sorted(optional))
            raise SystemExit(f"{project['name']} has no extra {extra!r} (it has {known})")
        seen_extras.add(extra)
        add(optional[extra])

    add(project.get("dependencies", []))
    for extra in extras:
        add_extra(extra)
    return out


def main(argv: list[str]) -> None:
    """`requirements.py PYPROJECT [EXTRA ...]`."""
    if not argv:
        raise SystemExit(__doc__)
    with open(argv[0], "rb") as f:
        project = tomllib.load(f)["project"]
    print("\n".join(requirements(project, argv[1:])))


if __name__ == "__main__":
    main(sys.argv[1:])
