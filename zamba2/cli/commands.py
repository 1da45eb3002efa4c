"""`zamba2 convert`, the delegated `bench` / `serve`, and the entry point `main()`: dispatch to a command and
turn every error into one stderr line and an exit code."""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from zamba2 import allocator
from zamba2.cli.evaluate import cmd_eval
from zamba2.cli.generate import _resolve, cmd_chat, cmd_generate
from zamba2.cli.parser import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, CommandError, UsageError, build_parser
from zamba2.cli.train import cmd_train

# Copied next to the converted weights (save_pretrained writes config.json and its own generation_config).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip
# Subcommands whose arguments belong to another module's parser.
DELEGATED = {"bench": ("zamba2.bench", "bench"), "serve": ("zamba2.serve", "serve")}


def _model_class(folder: Path):
    from zamba2 import checkpoint
    from zamba2.model import Zamba2ForCausalLM, Zamba2ForSequenceClassification, Zamba2Model

    architectures = checkpoint.read_config(folder).extras.get("architectures") or []
    for cls in (Zamba2ForSequenceClassification, Zamba2Model):
        if cls.__name__ in architectures:
            return cls
    return Zamba2ForCausalLM


def cmd_convert(args: argparse.Namespace) -> int:
    src = _resolve(args.src, args.revision, args.quiet)
    dst = Path(args.dst).expanduser()
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst} is a file; DST must be a folder")
    if dst.exists() and dst.resolve() == src.resolve():
        raise UsageError(f"{dst}: DST must be a different folder from SRC")
    cls = _model_class(src)
    model = cls.from_pretrained(src, dtype=args.dtype, quantize=args.quantize, progress=not args.quiet)
    model.save_pretrained(dst)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    if not args.quiet:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        extra = f", copied {', '.join(copied)}" if copied else ", no tokenizer files found in SRC"
        print(f"saved {cls.__name__} ({dtype}) to {dst}{extra}", file=sys.stderr)
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    module_name, extra = DELEGATED[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise CommandError(f"'zamba2 {name}' is not available: {module_name} is not installed") from err
        raise CommandError(
            f"'zamba2 {name}' needs {err.name!r}, which is not installed; "
            f"install the extra with: pip install 'zamba2[{extra}]'"
        ) from err
    if not callable(getattr(module, "main", None)):
        raise CommandError(f"'zamba2 {name}' is not available: {module_name} has no main(argv)")
    try:
        result = module.main(argv)
    except SystemExit as exit_:  # their argparse: --help, usage errors
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return EXIT_FAILURE
    return 0 if result is None else int(result)


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert, "train": cmd_train, "eval": cmd_eval}


# ---- entry point ---------------------------------------------------------------------------------


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    explained = isinstance(err, (ValueError, OSError, CommandError)) and str(err)
    text = str(err) if explained else f"{type(err).__name__}: {err}"
    lines = text.splitlines()
    if any(line[:1].isspace() for line in lines[1:]):  # an indented block (e.g. a code snippet) stays as is
        return text
    return " ".join(line.strip() for line in lines if line.strip())


def _guarded(run: Callable[[], int], debug: bool) -> int:
    """Run a command; turn every exception into one stderr line and an exit code."""
    try:
        return run()
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("\nzamba2: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (e.g. `| head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_FAILURE
    except Exception as err:  # noqa: BLE001 - the whole point: no bare tracebacks
        if debug:
            traceback.print_exc()
        user = isinstance(err, (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError))
        explained = isinstance(err, (ValueError, OSError, CommandError))
        hint = "" if debug or explained else " (run with --debug for the traceback)"
        print(f"zamba2: error: {_message(err)}{hint}", file=sys.stderr, flush=True)
        return EXIT_USAGE if user else EXIT_FAILURE


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = False
    while argv[:1] == ["--debug"]:
        debug, argv = True, argv[1:]
    if argv[:1] and argv[0] in DELEGATED:
        return _guarded(lambda: _delegate(argv[0], argv[1:]), debug)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, usage errors
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    debug = debug or getattr(args, "debug", False)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:  # generated text must never crash a terminal that is not UTF-8
        try:
            reconfigure(errors="replace")
        except (ValueError, OSError):
            pass
    return _guarded(lambda: _run(args), debug)


def _run(args) -> int:
    allocator.tune()  # keep activation memory between prompt chunks (see zamba2/allocator.py)
    return COMMANDS[args.command](args)
