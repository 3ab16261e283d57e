"""The ``evssm`` command line: one console command, many subcommands.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``evssm --help`` and
the client's commands work on a machine without JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

# (words, module, one-line help). Two-word commands ("bench model") come first so they match first.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("bench", "model"), "evssm.models.bench", "benchmark the model step in-process (JSON)"),
    (("bench", "serve"), "evssm.client.loadtest", "load-test a running server (JSON)"),
    (("serve",), "evssm.server.cli", "run the inference server"),
    (("train",), "evssm.models.train", "train a model: evssm train task=NAME [key=value ...]"),
    (("eval",), "evssm.models.evaluate", "evaluate a checkpoint offline and streaming"),
    (("import", "seed"), "evssm.models.seed_import",
     "import a checkpoint of the paper's reference code"),
    (("data",), "evssm.models.data.build", "build or inspect the offline data sets"),
    (("stream",), "evssm.client.stream_command", "stream a recording to a server, live view"),
    (("classify",), "evssm.client.classify_command", "classify recordings over HTTP"),
]


def _usage() -> str:
    lines = ["usage: evssm COMMAND [options]", "", "commands:"]
    for words, _, help_text in COMMANDS:
        lines.append(f"  {' '.join(words):<14} {help_text}")
    lines += ["", "Run 'evssm COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from evssm import __version__

        print(f"evssm {__version__}")
        return 0
    for words, module_name, help_text in COMMANDS:
        if tuple(argv[: len(words)]) == words:
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(
                prog="evssm " + " ".join(words),
                description=(module.__doc__ or help_text).strip().splitlines()[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            )
            module.add_arguments(parser)
            args = parser.parse_args(argv[len(words) :])
            return int(module.run(args) or 0)
    subcommands = [words[1] for words, _, _ in COMMANDS if len(words) > 1 and words[0] == argv[0]]
    if subcommands:
        print(f"evssm {argv[0]}: choose one of {', '.join(subcommands)} "
              f"(e.g. 'evssm {argv[0]} {subcommands[0]} --help')", file=sys.stderr)
        return 2
    print(f"evssm: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
