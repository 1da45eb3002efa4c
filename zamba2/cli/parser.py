"""The `zamba2` argument parser: exit codes, the two error kinds, argument types, and the subcommands' flags.

Nothing here imports torch: `zamba2 --help` answers at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import zamba2

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEFAULT_MAX_NEW_TOKENS = 256
DTYPES = ["auto", "fp32", "bf16", "fp16"]
QUANTIZE = ["int8", "int4"]

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


def _number(
    kind: type, lo: float, hi: float = math.inf, lo_open: bool = False, what: str = "", hi_open: bool = False
) -> Callable:
    """An argparse type: `kind` in [lo, hi] (an end excluded with lo_open / hi_open); NaN never passes."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _model_name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a model folder or a hub id like 'org/name', got ''")
    return text


def adapter_folder(text: str) -> str:
    """An argparse type: a PEFT LoRA folder, checked before any weights load (the files are read later)."""
    from pathlib import Path

    folder = Path(text)
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: not a folder (an adapter is a folder with adapter_config.json)")
    if not (folder / "adapter_config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no adapter_config.json (not a PEFT adapter folder)")
    return text


# ---- parser --------------------------------------------------------------------------------------


def _common(parent: argparse.ArgumentParser) -> None:
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    parent.add_argument("--quiet", "-q", action="store_true", help="no progress bars and no statistics line")


def _model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", "-m", type=_model_name, metavar="PATH_OR_ID",
                   help="model folder, or hub id such as Zyphra/Zamba2-1.2B-instruct (default: the shipped "
                   "Shakespeare model, zamba2.DEFAULT_MODEL)")  # fmt: skip
    g.add_argument("--revision", help="hub branch, tag or commit (hub ids only)")
    g.add_argument("--dtype", choices=DTYPES, default="auto", help="weights dtype; auto = config.json's (default)")
    g.add_argument("--device", default="cpu", help="torch device: cpu (default), cuda, cuda:1, mps")
    g.add_argument("--quantize", choices=QUANTIZE, help="weight-only quantisation of the linear layers")
    g.add_argument("--adapter", type=adapter_folder, metavar="FOLDER",
                   help="LoRA adapter in PEFT's format (e.g. the --out of `zamba2 train --lora-rank`)")  # fmt: skip
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


SPECULATIVE_HELP = (
    "propose a few tokens cheaply and check them with one pass of the model (batch 1): the same text as without "
    "it (greedy: the same tokens; sampling: the same distribution), faster where the proposals are right"
)


def _speculative_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speculative decoding", SPECULATIVE_HELP)
    how = g.add_mutually_exclusive_group()
    how.add_argument("--prompt-lookup", type=_number(int, 1, what=">= 1"), metavar="K",
                     help="propose up to K tokens that followed the last 2 tokens earlier in the prompt or the "
                     "text so far (no second model; fast on text that quotes its input)")  # fmt: skip
    how.add_argument("--draft-model", type=_model_name, metavar="PATH_OR_ID",
                     help="a smaller Zamba2 with the same tokenizer proposes the tokens")  # fmt: skip
    g.add_argument("--draft-tokens", type=_number(int, 1, what=">= 1"), metavar="K",
                   help="most tokens the draft model proposes per check (default 4; with --draft-model)")  # fmt: skip


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
    gen.add_argument("--tp", type=_number(int, 1, what=">= 1"), default=1, metavar="N",
                     help="tensor parallel over N processes (torchrun --nproc-per-node N); default 1")  # fmt: skip
    _model_args(gen)
    _sampling_args(gen)
    _speculative_args(gen)
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
    _speculative_args(chat)
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

    from zamba2.cli import evaluate, train

    train.add_parser(sub)
    evaluate.add_parser(sub)

    # Listed for --help only: main() hands their arguments to the module's own parser.
    sub.add_parser("bench", add_help=False, help="benchmarks (see 'zamba2 bench --help')")
    sub.add_parser("serve", add_help=False, help="HTTP server, needs the [serve] extra (see 'zamba2 serve --help')")
    return parser
