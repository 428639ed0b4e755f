"""The `lmcore` command line: one subcommand per capability, each registered by its module.

This is the only place (with the entry points) that reads the environment: torchrun's
RANK / WORLD_SIZE / LOCAL_RANK are read here and passed to the library explicitly.
Every handler returns an exit status. lmcore's own bad-input errors (`lmcore.errors.UserError`
and its subclasses: ConfigError, ShardError, ArtifactError, ...) are printed as one line
naming the file, field or value, with exit status 2; any other exception is a bug and keeps
its traceback. Ctrl-C ends with one line and status 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmcore.errors import UserError

# Modules that contribute subcommands: each has `register_cli(subparsers)`.
_CLI_MODULES = [
    "lmcore.info",
    "lmcore.data",
    "lmcore.fineweb",
    "lmcore.train",
    "lmcore.pack",
    "lmcore.evaluate",
    "lmcore.study",
    "lmcore.submission",
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmcore",
        description="lmcore: train, pack and evaluate parameter-golf language models.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _CLI_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a module not written yet must not break the others
            if e.name == name:
                continue
            raise
        mod.register_cli(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"lmcore {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmcore {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
