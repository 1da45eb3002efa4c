"""`zamba2 generate` and `zamba2 chat`: load a model and its tokenizer, turn the flags into sampling settings,
and stream the generated text to stdout with a statistics line on stderr."""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from zamba2.cli.parser import UsageError

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


def default_model(path_or_id: str | None, command: str) -> str:
    """--model, or the shipped default model (said on stderr) when it is not given."""
    if path_or_id is not None:
        return path_or_id
    import zamba2

    note = "a small Zamba2 trained on Shakespeare: it writes pseudo-Shakespeare, it does not answer questions"
    print(f"zamba2 {command}: no --model given; using the default model {zamba2.DEFAULT_MODEL} ({note})",
          file=sys.stderr)  # fmt: skip
    return str(zamba2.DEFAULT_MODEL)


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
    rank: int = 0  # tensor-parallel rank (--tp): only rank 0 prints
    draft: Any = None  # the --draft-model (Zamba2ForCausalLM), or None


def _check_world(tp: int) -> None:
    """--tp N must match the number of processes torchrun started (WORLD_SIZE), and one process has no --tp."""
    from zamba2.train.distributed import world_size_from_env

    world = world_size_from_env()
    if tp > 1 and world != tp:
        how = f"launch with: torchrun --nproc-per-node {tp} -m zamba2 generate --tp {tp} ..."
        raise UsageError(f"--tp {tp} needs {tp} processes but WORLD_SIZE is {world}; {how}")
    if tp == 1 and world > 1:
        raise UsageError(f"WORLD_SIZE is {world} (torchrun?) but --tp is 1; pass --tp {world} to shard the model")


def _load(folder: Path, tokenizer, args: argparse.Namespace) -> Loaded:
    from zamba2.model import Zamba2ForCausalLM

    device = _device(args.device)
    progress = not args.quiet
    draft = _draft_folder(args, folder)
    tp, rank = getattr(args, "tp", 1), 0
    if tp > 1:
        from zamba2 import tensor_parallel

        if args.quantize:
            raise UsageError("--tp cannot be combined with --quantize (tensor parallelism needs float weights)")
        ctx = tensor_parallel.join_tensor_parallel(tp, device)
        device, rank, progress = ctx.device, ctx.rank, progress and ctx.rank == 0
    model = Zamba2ForCausalLM.from_pretrained(
        folder, dtype=args.dtype, device=device, quantize=args.quantize, progress=progress, adapter=args.adapter
    )
    if tp > 1:
        tensor_parallel.parallelize(model, ctx.mesh)
    if args.compile:
        from zamba2.ops import compiled

        compiled.enable(True)
    from zamba2.checkpoint import eos_token_ids

    eos = eos_token_ids(folder, model.config.eos_token_id, tokenizer)
    return Loaded(folder, model, tokenizer, eos, rank, _load_draft(draft, model, device, progress))


def _draft_folder(args: argparse.Namespace, folder: Path) -> Path | None:
    """The --draft-model's folder, its config checked against the model's vocabulary before any weight loads."""
    name = getattr(args, "draft_model", None)
    if name is None:
        return None
    from zamba2.checkpoint import read_config
    from zamba2.speculative import check_draft_vocab

    draft = _resolve(name, None, args.quiet)
    try:
        check_draft_vocab(name, read_config(folder).vocab_size, read_config(draft).vocab_size)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return draft


def _load_draft(folder: Path | None, model, device, progress: bool):
    """The --draft-model in the model's dtype and device."""
    if folder is None:
        return None
    from zamba2.model import Zamba2ForCausalLM

    return Zamba2ForCausalLM.from_pretrained(folder, dtype=model.dtype, device=device, progress=progress).eval()


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
    speculation: Any = None  # zamba2.speculative.SpeculationStats with --prompt-lookup / --draft-model

    def line(self) -> str:
        prefill = f"{self.prompt_tokens / self.prefill_s:.1f} tok/s" if self.prefill_s > 0 else "n/a"
        steps = self.new_tokens - 1
        decode = f"{steps / self.decode_s:.1f} tok/s" if steps > 0 and self.decode_s > 0 else "n/a"
        line = (
            f"prompt: {self.prompt_tokens} tokens | generated: {self.new_tokens} tokens | "
            f"prefill: {prefill} | decode: {decode}"
        )
        sp = self.speculation
        if sp is not None:
            line += (f" | speculative: {sp.accepted}/{sp.proposed} drafts accepted ({100 * sp.acceptance_rate:.0f}%)"
                     f" in {sp.verifications} checks, {sp.plain_steps} plain steps")  # fmt: skip
        return line


@dataclass
class Sampling:
    """The generation settings from the command line."""

    params: Any  # zamba2.sampling.SamplingParams
    max_new_tokens: int
    stop: list[str]
    seed: int | None
    prompt_lookup: int | None = None  # --prompt-lookup K
    draft_tokens: int | None = None  # --draft-tokens K (with --draft-model)


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
    draft_tokens = getattr(args, "draft_tokens", None)
    if draft_tokens is not None and getattr(args, "draft_model", None) is None:
        raise UsageError("--draft-tokens needs --draft-model (the model that proposes the tokens)")
    lookup = getattr(args, "prompt_lookup", None)
    if getattr(args, "tp", 1) > 1 and (lookup is not None or getattr(args, "draft_model", None) is not None):
        raise UsageError("--prompt-lookup and --draft-model cannot be combined with --tp (one process only)")
    return Sampling(params, args.max_new_tokens, list(args.stop), args.seed, lookup, draft_tokens)


def _generator(seed: int | None, device):
    import torch

    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def _steps(loaded: Loaded, ids: list[int], s: Sampling, generator, speculation=None) -> Iterator[int]:
    import torch

    model, p = loaded.model, s.params
    input_ids = torch.tensor([ids], dtype=torch.long, device=model.device)
    spec: dict[str, Any] = {}
    if s.prompt_lookup is not None:
        spec = {"prompt_lookup_num_tokens": s.prompt_lookup, "speculation_stats": speculation}
    elif loaded.draft is not None:
        spec = {"assistant_model": loaded.draft, "num_assistant_tokens": s.draft_tokens,
                "speculation_stats": speculation}  # fmt: skip
    for tokens in model.generate_iter(
        input_ids, max_new_tokens=s.max_new_tokens, do_sample=p.do_sample, temperature=p.temperature,
        top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, repetition_penalty=p.repetition_penalty,
        eos_token_id=loaded.eos, stop_strings=s.stop or None, tokenizer=loaded.tokenizer if s.stop else None,
        generator=generator, **spec,
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
    if s.prompt_lookup is not None or loaded.draft is not None:
        from zamba2.speculative import SpeculationStats

        stats.speculation = SpeculationStats()
    interrupted = False
    start = first = time.perf_counter()
    try:
        for token in _steps(loaded, ids, s, generator, stats.speculation):
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
    _check_world(args.tp)
    s = _sampling(args)
    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    prompt = _read_prompt(args)
    args.model = default_model(args.model, "generate")
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
    out = sys.stdout
    if args.tp > 1:  # every rank runs the same steps with the same seed; rank 0 prints
        from zamba2.tensor_parallel import common_seed

        s.seed = common_seed(s.seed)
        out = sys.stdout if loaded.rank == 0 else io.StringIO()
    _, stats, _ = stream(loaded, ids, s, _generator(s.seed, loaded.model.device), out)
    if not args.quiet and loaded.rank == 0:
        print(stats.line(), file=sys.stderr, flush=True)
    if args.tp > 1:
        from zamba2.train.distributed import shutdown

        shutdown()
    return 0


CHAT_HELP = "commands: /reset clears the conversation, /exit quits; Ctrl-C stops an answer"


def cmd_chat(args: argparse.Namespace) -> int:
    s = _sampling(args)
    args.model = default_model(args.model, "chat")
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
