"""The ``evssm`` command line: one console command, many subcommands.

Each subcommand lives in the module that owns it and exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs, so ``evssm --help`` and
the client's commands work on a machine without JAX.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

# (words, module, one-line help). Two-word commands ("bench model") come first so they match first.
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("bench", "model"), "evssm.models.bench", "benchmark the model step in-process (JSON)"),
    (("bench", "serve"), "evssm.client.loadtest", "load-test a running server (JSON)"),
    (("bench", "soak"), "evssm.client.soak", "soak a server for minutes: RSS trend, wrong answers (JSON)"),
    (("bench", "startup"), "evssm.server.bench_startup",
     "time evssm serve to ready, cold and with a warm compilation cache (JSON)"),
    (("serve",), "evssm.server.cli", "run the inference server"),
    (("train",), "evssm.models.train", "train a model: evssm train task=NAME [key=value ...]"),
    (("eval",), "evssm.models.evaluate", "evaluate a checkpoint offline and streaming"),
    (("import", "seed"), "evssm.models.seed_import",
     "import a checkpoint of the paper's reference code"),
    (("data",), "evssm.models.data.build", "build or inspect the offline data sets"),
    (("stream",), "evssm.client.stream_command", "stream a recording to a server, live view"),
    (("classify",), "evssm.client.classify_command", "classify recordings over HTTP"),
]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows an option's default once: where its help does not already state one, and only a
    real value (not None or False). Descriptions and epilogs keep their own line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default: Any = action.default
        if (re.search(r"\(default\b", text) or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or action.help == argparse.SUPPRESS):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def _usage(group: tuple[str, ...] = ()) -> str:
    """The list of commands (those starting with ``group``, e.g. ``("bench",)``)."""
    prefix = " ".join(group + ("COMMAND",)) if group else "COMMAND"
    lines = [f"usage: evssm {prefix} [options]", "", "commands:"]
    for words, _, help_text in COMMANDS:
        if words[: len(group)] == group:
            lines.append(f"  {' '.join(words):<14} {help_text}")
    lines += ["", "Run 'evssm COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (``evssm classify --json | head``): stop quietly, as
    other command-line tools do, instead of a traceback at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # Python's final flush of stdout must not fail again
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by a closed pipe


def _user_error(prog: str, message: str) -> int:
    """A mistake of the user: one line of advice on stderr, exit 2, no traceback."""
    message = message.strip()
    print(message if message.startswith(prog) else f"{prog}: {message}", file=sys.stderr)
    return 2


def _os_error_text(exc: OSError) -> str:
    """``[Errno 2] No such file or directory: 'x'`` -> ``no such file or directory: x``; a
    message of our own (no errno) as it is."""
    if exc.errno is None or exc.strerror is None:
        return str(exc)
    return f"{exc.strerror.lower()}: {exc.filename}" if exc.filename else exc.strerror.lower()


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
                formatter_class=HelpFormatter,
            )
            module.add_arguments(parser)
            args = parser.parse_args(argv[len(words):])
            try:
                code = int(module.run(args) or 0)
                sys.stdout.flush()
            except BrokenPipeError:
                return _quiet_broken_pipe()
            except SystemExit as exc:
                if not isinstance(exc.code, str):
                    raise
                return _user_error(parser.prog, exc.code)
            except FileNotFoundError as exc:  # a missing data set, checkpoint, config or file
                return _user_error(parser.prog, _os_error_text(exc))
            return code
    group = (argv[0],)
    if any(words[:1] == group and len(words) > 1 for words, _, _ in COMMANDS):
        # "evssm bench", "evssm bench --help": the group's commands.
        asked = len(argv) == 1 or argv[1] in ("-h", "--help", "help")
        if not asked:
            print(f"evssm: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_usage(group), file=sys.stdout if asked else sys.stderr)
        return 0 if asked else 2
    print(f"evssm: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
    print(_usage(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
