"""The installed console script, run for real in a subprocess: generate, chat fed from stdin, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_cli import CHAT_TEMPLATE, make_model_folder

STATS = re.compile(r"prompt: \d+ tokens \| generated: \d+ tokens \| prefill: [\d.]+ tok/s \| decode: [\d.]+ tok/s")


def zamba2_command() -> list[str]:
    script = Path(sys.executable).parent / "zamba2"  # the console script pip installed next to this python
    return [str(script)] if script.exists() else [sys.executable, "-m", "zamba2"]


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    return subprocess.run(
        zamba2_command() + list(args), input=stdin, capture_output=True, text=True, timeout=120, env=env
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("cli") / "tiny", chat_template=CHAT_TEMPLATE,
                             max_position_embeddings=64)  # fmt: skip


def test_generate_streams_the_greedy_text_and_prints_stats(folder):
    out = run("generate", "--model", str(folder), "--max-new-tokens", "12", "Hello there")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert STATS.search(out.stderr.strip().splitlines()[-1]), out.stderr

    from zamba2 import Tokenizer, Zamba2ForCausalLM

    model, tok = Zamba2ForCausalLM.from_pretrained(folder, progress=False), Tokenizer.from_pretrained(folder)
    ids = torch.tensor([tok.encode("Hello there")])
    new = model.generate(ids, max_new_tokens=12, eos_token_id=[tok.eos_token_id])[0, ids.shape[1] :]
    assert out.stdout.rstrip("\n") == tok.decode(new.tolist(), skip_special_tokens=True)


def test_chat_from_stdin_keeps_and_resets_the_conversation(folder):
    out = run("chat", "--model", str(folder), "--max-new-tokens", "4", stdin="hello\nagain\n/reset\nonce more\n/exit\n")
    assert out.returncode == 0, out.stderr
    prompts = [int(n) for n in re.findall(r"prompt: (\d+) tokens", out.stderr)]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0] and prompts[2] < prompts[1]  # history kept, then cleared by /reset


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "/nonexistent/model-dir", "hi"], "/nonexistent/model-dir"),
        (["generate", "--model", "{folder}", "--max-new-tokens", "0", "hi"], "max-new-tokens"),
        (["generate", "--model", "{folder}", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--model", "{folder}", "--top-p", "1.5", "hi"], "top-p"),
        (["generate", "--model", "{folder}", "--top-p", "0", "hi"], "top-p"),
        (["generate", "--model", "{folder}", "word " * 80], "max_position_embeddings"),
        (["generate", "--model", "{folder}", "--dtype", "int3", "hi"], "dtype"),
    ],
)
def test_bad_input_is_one_clear_line(folder, args, message):
    out = run(*[a.replace("{folder}", str(folder)) for a in args])
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert message in lines[-1], out.stderr
