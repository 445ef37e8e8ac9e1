"""Summarise a py-spy raw (collapsed) profile of keyless: where its CPU time goes.

    python -m bench.profile_summary PROFILE.txt

Prints the share of samples whose stack passes through each area (inclusive: one sample can
count for several areas), then keyless' own functions and the busiest leaf functions.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?):(?P<line>\d+)\)$")

# (area, predicate on (function, file)); first match per frame, all areas per stack
AREAS: list[tuple[str, str]] = [
    ("keyless addons (addons/*)", r"^addons/"),
    ("keyless core (proxy/*, not the CLI/event-loop entry)", r"^proxy/(?!cli\.py|mitm\.py)"),
    ("mitmproxy addon dispatch (addonmanager)", r"mitmproxy/addonmanager\.py"),
    ("mitmproxy default addons (mitmproxy/addons/*)", r"mitmproxy/addons/"),
    ("mitmproxy HTTP layer (proxy/layers/http)", r"mitmproxy/proxy/layers/http/"),
    ("mitmproxy TLS layer (proxy/layers/tls.py)", r"mitmproxy/proxy/layers/tls\.py"),
    ("mitmproxy connection handler (proxy/server.py)", r"mitmproxy/proxy/server\.py"),
    ("OpenSSL via pyOpenSSL (OpenSSL/SSL.py)", r"OpenSSL/SSL\.py"),
    ("prometheus_client", r"prometheus_client/"),
    ("logging", r"^logging/"),
    ("asyncio machinery", r"^asyncio/"),
]


def parse(path: Path) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = []
        for raw in stack.split(";"):
            match = FRAME.match(raw)
            frames.append((match["func"], match["file"]) if match else (raw, ""))
        stacks.append((frames, int(count)))
    return stacks


def summarise(path: Path) -> str:
    stacks = parse(path)
    total = sum(n for _, n in stacks) or 1
    areas: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for frames, n in stacks:
        hit = {name for name, pattern in AREAS
               if any(re.search(pattern, file) for _, file in frames)}
        for name in hit:
            areas[name] += n
        for func, file in {(f, fi) for f, fi in frames
                           if re.match(r"^(addons|proxy)/", fi)
                           and not re.match(r"^proxy/(cli|mitm)\.py", fi)}:
            ours[f"{func} ({file})"] += n
        func, file = frames[-1]
        leaves[f"{func} ({file})"] += n
    lines = [f"{total} samples (CPU-busy only)", "", "area (inclusive share of samples):"]
    lines += [f"  {areas[name] / total:6.1%}  {name}" for name, _ in AREAS]
    lines += ["", "keyless functions (inclusive):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in ours.most_common(15)]
    lines += ["", "busiest leaf functions (self time):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in leaves.most_common(20)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__)
        return 2
    print(summarise(Path(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
