#!/usr/bin/env python3
"""Print the third-party requirements of an evssm extra, one per line, from pyproject.toml.

The Dockerfile installs these in a layer of their own before it copies the source, so that editing
code does not reinstall JAX. Self-references such as ``evssm[model]`` are expanded recursively.

    python requirements.py pyproject.toml server > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    project = pyproject["project"]
    name = project["name"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = []
    seen: set[str] = set()

    def add(requirement: str) -> None:
        match = re.fullmatch(rf"\s*{re.escape(name)}\s*\[([^\]]+)\]\s*", requirement)
        if match:
            for extra in match.group(1).split(","):
                expand(extra.strip())
        elif requirement not in out:
            out.append(requirement)

    def expand(extra: str) -> None:
        if extra in seen:
            return
        if extra not in optional:
            raise SystemExit(f"{name} has no extra {extra!r} (has: {', '.join(optional)})")
        seen.add(extra)
        for requirement in optional[extra]:
            add(requirement)

    for requirement in project.get("dependencies", []):
        add(requirement)
    for extra in extras:
        expand(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1], "rb") as f:
        pyproject = tomllib.load(f)
    print("\n".join(requirements(pyproject, argv[2:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
