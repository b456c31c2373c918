"""`python -m bench NAME [OPTIONS]` runs one benchmark; `python -m bench` lists them all."""

from __future__ import annotations

import importlib
import sys
import textwrap

from bench import BENCHMARKS

USAGE = "usage: python -m bench NAME [OPTIONS]   (python -m bench NAME --help: its options)"


def listing() -> str:
    width = max(len(name) for name in BENCHMARKS)
    lines = [USAGE, "", "benchmarks (target):"]
    for kind in ("pipeline", "service", "studies"):
        lines.append(f"  {kind}/")
        for b in BENCHMARKS.values():
            if b.kind == kind:
                wrapped = textwrap.wrap(b.target, 96 - width - 6)
                lines.append(f"    {b.name:<{width}}  {wrapped[0]}")
                lines += [f"    {'':<{width}}  {line}" for line in wrapped[1:]]
    lines += ["  gpu/", "    bash bench/gpu/gpu.sh  every GPU benchmark in one go (BENCHMARKS.md)"]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(listing())
        return 0
    name, rest = argv[0], argv[1:]
    benchmark = BENCHMARKS.get(name)
    if benchmark is None:
        print(f"error: no benchmark named {name!r}; `python -m bench` lists them",
              file=sys.stderr)
        return 2
    importlib.import_module(benchmark.module).main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
