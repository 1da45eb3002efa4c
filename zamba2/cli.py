"""The `zamba2` command line (also `python -m zamba2`): generate, chat, convert, bench, serve.

    zamba2 generate --model Zyphra/Zamba2-1.2B-instruct --chat "Why is the sky blue?"
    zamba2 chat --model Zyphra/Zamba2-1.2B-instruct --system "You are terse."
    zamba2 convert ./legacy-checkpoint ./upstream-checkpoint --dtype bf16
    zamba2 bench ...      (zamba2.bench)
    zamba2 serve ...      (zamba2.serve, needs the [serve] extra)

Errors reach the user as one line on stderr: exit code 2 for bad input (arguments, paths, files), 1 for
failures while running. `--debug` (before or after the subcommand) adds the traceback. torch and the model
stack are imported only once a command runs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import zamba2

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_MAX_NEW_TOKENS = 256
# Copied next to the converted weights (save_pretrained writes config.json and its own generation_config).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "chat_template.jinja", "generation_config.json",
)  # fmt: skip
DTYPES = ["auto", "fp32", "bf16", "fp16"]
QUANTIZE = ["int8", "int4"]
# Subcommands whose arguments belong to another module's parser.
DELEGATED = {"bench": ("zamba2.bench", "bench"), "serve": ("zamba2.serve", "serve")}

SAMPLING_HELP = """\
Greedy decoding unless sampling is asked for: --do-sample, or any of --temperature, --top-k, --top-p,
--min-p turns sampling on (with temperature 1.0 unless given). --temperature 0 is greedy. --greedy forces
greedy decoding and cannot be combined with those flags. Generation stops at the end-of-sequence token
(config.json, generation_config.json and the tokenizer's eos), after --max-new-tokens, or once the text
contains a --stop string; the stop string is kept in the output, as transformers does."""


class UsageError(ValueError):
    """Bad command-line input found after parsing (exit code 2)."""


class CommandError(RuntimeError):
    """A failure while running, already explained by its message (exit code 1)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---- argument types ------------------------------------------------------------------------------


def _number(kind: type, lo: float, hi: float = math.inf, lo_open: bool = False, what: str = "") -> Callable:
    """An argparse type: `kind` in [lo, hi] (or (lo, hi] when lo_open); NaN never passes."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and value <= hi
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model folder or a hub id like 'org/name', got ''")
    return text


# ---- parser --------------------------------------------------------------------------------------


def _common(parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parent.add_argument("--quiet", "-q", action="store_true", help="no progress bars and no statistics line")


def _model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", required=True, type=_model_name, metavar="PATH_OR_ID",
                   help="model folder, or hub id such as Zyphra/Zamba2-1.2B-instruct")  # fmt: skip
    g.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype; auto = config.json's (default)")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps")
    g.add_argument("--quantize", choices=QUANTIZE, help="weight-only quantisation of the linear layers")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the mixer decode step (faster decode; first run compiles ~20 s)")  # fmt: skip


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling", SAMPLING_HELP)
    g.add_argument("--max-new-tokens", type=_number(int, 1, what=">= 1"), default=DEFAULT_MAX_NEW_TOKENS,
                   metavar="N", help="most tokens to generate (default: %(default)s)")  # fmt: skip
    g.add_argument("--temperature", type=_number(float, 0, what=">= 0"), metavar="T",
                   help="divide the logits by T before sampling (0 = greedy)")  # fmt: skip
    g.add_argument("--top-k", type=_number(int, 0, what=">= 0 (0 = off)"), metavar="K",
                   help="sample among the K most likely tokens")  # fmt: skip
    g.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True, what="in (0, 1]"), metavar="P",
                   help="nucleus sampling: the smallest set of tokens with probability mass P")  # fmt: skip
    g.add_argument("--min-p", type=_number(float, 0, 1, what="in [0, 1]"), metavar="P",
                   help="drop tokens less likely than P times the most likely one")  # fmt: skip
    g.add_argument("--repetition-penalty", type=_number(float, 0, lo_open=True, what="> 0 (1 = off)"),
                   default=1.0, metavar="R", help="CTRL penalty on tokens already seen (default: 1.0)")  # fmt: skip
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    mode.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    g.add_argument("--seed", type=int, help="seed for sampling (reproducible output)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop once the generated text contains TEXT (repeatable)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zamba2", description="Run Zyphra's Zamba2 language models.")
    parser.add_argument("--version", action="version", version=f"zamba2 {zamba2.__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = sub.add_parser(
        "generate",
        help="continue a prompt, streaming the text",
        description="Continue a prompt and stream the new text to stdout; a statistics line goes to stderr.",
    )
    gen.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from stdin")
    gen.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE ('-' = stdin)")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the model's chat template as one user message"
    )
    gen.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the bos token (plain prompts)")
    _model_args(gen)
    _sampling_args(gen)
    _common(gen)

    chat = sub.add_parser(
        "chat",
        help="interactive multi-turn chat",
        description="Chat with an instruct model. /reset clears the conversation, /exit (or end of input) "
        "quits; Ctrl-C stops the current answer, or quits at the prompt.",
    )
    chat.add_argument("--system", metavar="TEXT", help="system message that starts every conversation")
    _model_args(chat)
    _sampling_args(chat)
    _common(chat)

    conv = sub.add_parser(
        "convert",
        help="re-save a checkpoint (any supported format) in the upstream format",
        description="Load SRC (folder or hub id; upstream or original Zyphra layout) and "
        "write it to DST in the published safetensors layout, with its tokenizer files.",
    )
    conv.add_argument("src", metavar="SRC", type=_model_name)
    conv.add_argument("dst", metavar="DST")
    conv.add_argument("--dtype", choices=DTYPES, default="auto", help="saved weights dtype; auto = SRC's (default)")
    conv.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    conv.add_argument("--quantize", choices=QUANTIZE, help="save weight-only quantised linear layers")
    _common(conv)

    # Listed for --help only: main() hands their arguments to the module's own parser.
    sub.add_parser("bench", add_help=False, help="benchmarks (see 'zamba2 bench --help')")
    sub.add_parser("serve", add_help=False, help="HTTP server, needs the [serve] extra (see 'zamba2 serve --help')")
    return parser


# ---- loading -------------------------------------------------------------------------------------


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available to this torch ({torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available")
    return device


def _resolve(path_or_id: str, revision: str | None, quiet: bool) -> Path:
    from zamba2 import checkpoint

    if quiet:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    folder = checkpoint.resolve_model_dir(path_or_id, revision=revision)
    checkpoint.read_config(folder)  # a bad config.json is reported before anything else is loaded
    return folder


def _load_tokenizer(folder: Path, need_chat: bool):
    from zamba2.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_pretrained(folder)
    if need_chat and tokenizer.chat_template is None:
        raise UsageError(
            f"{folder}: the tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
            "chat_template.jinja); use `zamba2 generate` without --chat for plain text completion"
        )
    return tokenizer


@dataclass
class Loaded:
    """What a generating command works with."""

    folder: Path
    model: Any  # Zamba2ForCausalLM
    tokenizer: Any  # zamba2.tokenizer.Tokenizer
    eos: list[int]  # every end-of-sequence id the checkpoint names


def _load(folder: Path, tokenizer, args: argparse.Namespace) -> Loaded:
    from zamba2.model import Zamba2ForCausalLM

    device = _device(args.device)
    progress = not args.quiet
    model = Zamba2ForCausalLM.from_pretrained(
        folder, dtype=args.dtype, device=device, quantize=args.quantize, progress=progress
    )
    if args.compile:
        from zamba2.ops import compiled

        compiled.enable(True)
    from zamba2.checkpoint import eos_token_ids

    return Loaded(folder, model, tokenizer, eos_token_ids(folder, model.config.eos_token_id, tokenizer))


def _check_ids(ids: list[int], loaded: Loaded) -> None:
    vocab = loaded.model.config.vocab_size
    if max(ids) >= vocab:
        raise ValueError(f"{loaded.folder}: the tokenizer gave id {max(ids)}, the model's vocab_size is {vocab}")


# ---- streaming -----------------------------------------------------------------------------------


@dataclass
class Stats:
    prompt_tokens: int
    new_tokens: int = 0
    prefill_s: float = 0.0  # prompt in, first token out
    decode_s: float = 0.0  # the remaining new_tokens - 1 steps

    def line(self) -> str:
        prefill = f"{self.prompt_tokens / self.prefill_s:.1f} tok/s" if self.prefill_s > 0 else "n/a"
        steps = self.new_tokens - 1
        decode = f"{steps / self.decode_s:.1f} tok/s" if steps > 0 and self.decode_s > 0 else "n/a"
        return (
            f"prompt: {self.prompt_tokens} tokens | generated: {self.new_tokens} tokens | "
            f"prefill: {prefill} | decode: {decode}"
        )


@dataclass
class Sampling:
    """The generation settings from the command line."""

    params: Any  # zamba2.sampling.SamplingParams
    max_new_tokens: int
    stop: list[str]
    seed: int | None


def _sampling(args: argparse.Namespace) -> Sampling:
    from zamba2.sampling import SamplingParams

    flags = {"--temperature": args.temperature, "--top-k": args.top_k, "--top-p": args.top_p, "--min-p": args.min_p}
    given = [flag for flag, value in flags.items() if value is not None]
    if args.greedy and given:
        raise UsageError(f"--greedy cannot be combined with {given[0]} (a sampling setting)")
    if any(not stop for stop in args.stop):
        raise UsageError("--stop needs a non-empty string")
    params = SamplingParams(
        do_sample=not args.greedy and (args.do_sample or bool(given)),
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k or 0,
        top_p=1.0 if args.top_p is None else args.top_p,
        min_p=args.min_p or 0.0,
        repetition_penalty=args.repetition_penalty,
    ).validate()  # the argparse types already checked each flag; this is the library's word on it
    return Sampling(params, args.max_new_tokens, list(args.stop), args.seed)


def _generator(seed: int | None, device):
    import torch

    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _steps(loaded: Loaded, ids: list[int], s: Sampling, generator) -> Iterator[int]:
    import torch

    model, p = loaded.model, s.params
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    for tokens in model.generate_iter(
        input_ids, max_new_tokens=s.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
        top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
        eos_token_id=loaded.eos, stop_strings=s.stop or None, tokenizer=loaded.tokenizer if s.stop else None,
        generator=generator,
    ):  # fmt: skip
        yield int(tokens[0])  # int() waits for the device, so the timings below are real


def stream(
    loaded: Loaded, ids: list[int], s: Sampling, generator, out: TextIO, catch_interrupt: bool = False
) -> tuple[list[int], Stats, bool]:
    """Generate after `ids`, writing text to `out` as it completes; returns (new ids, stats, interrupted).

    With `catch_interrupt`, Ctrl-C ends this answer (what was generated is kept) instead of propagating.
    """
    from zamba2.tokenizer import StreamDecoder

    decoder = StreamDecoder(loaded.tokenizer, skip_special_tokens=True)
    stats, new = Stats(prompt_tokens=len(ids)), []
    interrupted = False
    start = first = time.perf_counter()
    try:
        for token in _steps(loaded, ids, s, generator):
            if not new:
                first = time.perf_counter()
                stats.prefill_s = first - start
            new.append(token)
            text = decoder.push(token)
            if text:
                out.write(text)
                out.flush()
    except KeyboardInterrupt:
        if not catch_interrupt:
            raise
        interrupted = True
    if new:
        stats.decode_s = time.perf_counter() - first
    stats.new_tokens = len(new)
    out.write(decoder.flush() + "\n")
    out.flush()
    return new, stats, interrupted


# ---- commands ------------------------------------------------------------------------------------


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give the prompt either as an argument or with --prompt-file, not both")
    source = args.prompt_file if args.prompt_file is not None else args.prompt
    if source is None:
        raise UsageError("no prompt: give it as an argument, with --prompt-file FILE, or '-' to read stdin")
    if args.prompt_file is None and source != "-":
        return source
    if source == "-":
        text = sys.stdin.read()
    else:
        path = Path(source)
        if path.is_dir():
            raise UsageError(f"--prompt-file {path}: is a folder, expected a text file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"--prompt-file {path}: no such file") from None
        except UnicodeDecodeError as err:
            raise UsageError(f"--prompt-file {path}: not UTF-8 text ({err.reason})") from None
    # A file or pipe ends with a newline by convention; that newline is not part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def cmd_generate(args: argparse.Namespace) -> int:
    s = _sampling(args)
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    prompt = _read_prompt(args)
    folder = _resolve(args.model, args.revision, args.quiet)
    tokenizer = _load_tokenizer(folder, need_chat=args.chat)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        ids = tokenizer.encode(prompt, add_special_tokens=not args.no_bos)
    if not ids:
        raise UsageError("the prompt is empty (and --no-bos leaves no token to start from)")
    loaded = _load(folder, tokenizer, args)
    _check_ids(ids, loaded)
    _, stats, _ = stream(loaded, ids, s, _generator(s.seed, loaded.model.device), sys.stdout)
    if not args.quiet:
        print(stats.line(), file=sys.stderr, flush=True)
    return 0


CHAT_HELP = "commands: /reset clears the conversation, /exit quits; Ctrl-C stops an answer"


def cmd_chat(args: argparse.Namespace) -> int:
    s = _sampling(args)
    folder = _resolve(args.model, args.revision, args.quiet)
    tokenizer = _load_tokenizer(folder, need_chat=True)
    loaded = _load(folder, tokenizer, args)
    generator = _generator(s.seed, loaded.model.device)  # one stream of random numbers for the session
    start = [{"role": "system", "content": args.system}] if args.system is not None else []
    messages = list(start)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"zamba2 chat with {args.model} ({CHAT_HELP})", file=sys.stderr)
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: leave quietly
            print()
            return 0
        text = line.strip()  # the message as typed, without the surrounding whitespace
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            messages = list(start)
            print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if text.startswith("/") and " " not in text:
            print(f"unknown command {text}; {CHAT_HELP}", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            _check_ids(ids, loaded)
        except ValueError as err:  # e.g. a template that rejects the conversation: report, keep chatting
            messages.pop()
            print(f"zamba2 chat: error: {err}", file=sys.stderr, flush=True)
            continue
        new, stats, interrupted = stream(loaded, ids, s, generator, sys.stdout, catch_interrupt=True)
        # The partial answer of an interrupted turn stays in the conversation.
        messages.append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
        if not args.quiet:
            note = " (interrupted)" if interrupted else ""
            print(stats.line() + note, file=sys.stderr, flush=True)


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


COMMANDS = {"generate": cmd_generate, "chat": cmd_chat, "convert": cmd_convert}


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
    return _guarded(lambda: COMMANDS[args.command](args), debug)


if __name__ == "__main__":
    sys.exit(main())
