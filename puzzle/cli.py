"""The `puzzle` command line: `puzzle run|submit|status|logs|stop|estimate|search|check-export ...`.

Each subcommand lives in its stage's module, which exposes `register(subparsers)`; the parser it adds
sets `func=callable(args) -> int`. A `PuzzleError` (a problem the user can fix) becomes one line on
stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from puzzle.errors import PuzzleError

# Modules that contribute subcommands, in the order they appear in --help.
COMMAND_MODULES = (
    "puzzle.runner.run",
    "puzzle.runner.jobs",
    "puzzle.estimate.cli",
    "puzzle.stages.search.cli",
    "puzzle.hf.gguf",
    "puzzle.hf.engines",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="puzzle", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Hydra overrides (key=value) may come after options too: `puzzle run JOB --until data bld.tokens=5`.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if getattr(args, "overrides", None) is None or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except PuzzleError as err:
        print(f"puzzle: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("puzzle: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
