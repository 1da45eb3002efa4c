"""The `zamba2` command line (also `python -m zamba2`): generate, chat, convert, train, eval, bench, serve.

    zamba2 generate --model Zyphra/Zamba2-1.2B-instruct --chat "Why is the sky blue?"
    zamba2 chat --model Zyphra/Zamba2-1.2B-instruct --system "You are terse."
    zamba2 convert ./legacy-checkpoint ./upstream-checkpoint --dtype bf16
    zamba2 eval --model ./checkpoint --text held-out.txt --choices items.jsonl
    zamba2 bench ...      (zamba2.bench)
    zamba2 serve ...      (zamba2.serve, needs the [serve] extra)

Errors reach the user as one line on stderr: exit code 2 for bad input (arguments, paths, files), 1 for
failures while running. `--debug` (before or after the subcommand) adds the traceback. torch and the model
stack are imported only once a command runs, so `--help` answers at once.

    parser.py     exit codes, UsageError / CommandError, argument types, `build_parser`
    generate.py   loading a model and tokenizer, sampling settings, streaming; `generate` and `chat`
    commands.py   `convert`, the delegated `bench` / `serve`, error reporting, `main`
    train.py      `train`; evaluate.py: `eval` (zamba2.eval)

Every name of the former single module zamba2/cli.py is importable from here; its private helpers are
re-exported as `_name as _name` (they are not part of the API).
"""

from zamba2.cli.commands import (
    COMMANDS,
    DELEGATED,
    TOKENIZER_FILES,
    cmd_convert,
    main,
)
from zamba2.cli.commands import _delegate as _delegate
from zamba2.cli.commands import _guarded as _guarded
from zamba2.cli.commands import _message as _message
from zamba2.cli.commands import _model_class as _model_class
from zamba2.cli.generate import (
    CHAT_HELP,
    Loaded,
    Sampling,
    Stats,
    cmd_chat,
    cmd_generate,
    stream,
)
from zamba2.cli.generate import _check_ids as _check_ids
from zamba2.cli.generate import _device as _device
from zamba2.cli.generate import _generator as _generator
from zamba2.cli.generate import _load as _load
from zamba2.cli.generate import _load_tokenizer as _load_tokenizer
from zamba2.cli.generate import _read_prompt as _read_prompt
from zamba2.cli.generate import _resolve as _resolve
from zamba2.cli.generate import _sampling as _sampling
from zamba2.cli.generate import _steps as _steps
from zamba2.cli.parser import (
    DEFAULT_MAX_NEW_TOKENS,
    DTYPES,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    QUANTIZE,
    SAMPLING_HELP,
    CommandError,
    UsageError,
    build_parser,
)
from zamba2.cli.parser import _common as _common
from zamba2.cli.parser import _model_args as _model_args
from zamba2.cli.parser import _model_name as _model_name
from zamba2.cli.parser import _number as _number
from zamba2.cli.parser import _Parser as _Parser
from zamba2.cli.parser import _sampling_args as _sampling_args

__all__ = [
    "CHAT_HELP",
    "COMMANDS",
    "CommandError",
    "DEFAULT_MAX_NEW_TOKENS",
    "DELEGATED",
    "DTYPES",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "Loaded",
    "QUANTIZE",
    "SAMPLING_HELP",
    "Sampling",
    "Stats",
    "TOKENIZER_FILES",
    "UsageError",
    "build_parser",
    "cmd_chat",
    "cmd_convert",
    "cmd_generate",
    "main",
    "stream",
]
