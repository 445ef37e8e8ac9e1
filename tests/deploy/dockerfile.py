"""A small Dockerfile reader for the deploy tests (no Docker engine needed).

It understands what keyless' Dockerfile uses: line continuations, comments, `ARG` defaults in
`FROM`, `ENV k=v ...`, `USER`, `COPY`, `HEALTHCHECK ... CMD [json]`, `ENTRYPOINT`/`CMD` in
JSON form. Stages are kept apart so tests can ask about the final image only.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            for token in shlex.split(args):
                if "=" not in token:
                    raise ValueError(f"ENV must use KEY=VALUE form: {args!r}")
                key, _, value = token.partition("=")
                env[key] = value
        return env

    @property
    def user(self) -> str | None:
        return self.last("USER")

    def exec_form(self, keyword: str) -> list[str]:
        args = self.last(keyword)
        if args is None:
            raise ValueError(f"no {keyword}")
        return json.loads(args)

    @property
    def healthcheck(self) -> tuple[dict[str, str], list[str]]:
        """(options, command) of the last HEALTHCHECK, whose command must be in JSON form."""
        args = self.last("HEALTHCHECK")
        if args is None:
            raise ValueError("no HEALTHCHECK")
        match = re.fullmatch(r"((?:--[a-z-]+=\S+\s+)*)CMD\s+(\[.*\])", args, re.S)
        if not match:
            raise ValueError(f"HEALTHCHECK must be `[--opt=v ...] CMD [json]`: {args!r}")
        options = dict(opt[2:].split("=", 1) for opt in match.group(1).split())
        return options, json.loads(match.group(2))


def logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped by Docker
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse(path: Path) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical_lines(path.read_text()):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)],
                          parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=base, name=name))
        else:
            if not stages:
                raise ValueError(f"{keyword} before the first FROM")
            stages[-1].instructions.append((keyword, rest))
    return stages
