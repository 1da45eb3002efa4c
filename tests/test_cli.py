"""The `zamba2` command line, run in-process: generate, chat, convert, delegation, errors."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from helpers_cli import CHAT_TEMPLATE, make_model_folder, set_chat_template

from zamba2 import cli
from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.tokenizer import Tokenizer

PROMPT = "The capital of France is"
STATS = re.compile(
    r"prompt: (\d+) tokens \| generated: (\d+) tokens \| prefill: [\d.]+ tok/s \| decode: ([\d.]+ tok/s|n/a)"
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matmuls on a shared, busy machine: two threads can be ten times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("cli") / "tiny")


@pytest.fixture(scope="module")
def chat_folder(folder, tmp_path_factory):
    target = tmp_path_factory.mktemp("cli") / "tiny-chat"
    shutil.copytree(folder, target)
    set_chat_template(target, CHAT_TEMPLATE)
    return target


@pytest.fixture(scope="module")
def loaded(folder):
    return Zamba2ForCausalLM.from_pretrained(folder, progress=False), Tokenizer.from_pretrained(folder)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def expected_text(loaded, ids: list[int], n: int, **kw) -> tuple[str, list[int]]:
    model, tok = loaded
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[2], **kw)
    new = out[0, len(ids) :].tolist()
    return tok.decode(new, skip_special_tokens=True), new


def stats(err: str) -> list[tuple[int, int]]:
    return [(int(m[1]), int(m[2])) for m in STATS.finditer(err)]


def assert_one_line_error(err: str, *needles: str) -> None:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err


# ---- generate ------------------------------------------------------------------------------------


def test_generate_greedy_matches_model_generate_and_reports_stats(capsys, folder, loaded):
    code, out, err = run(capsys, "generate", "--model", folder, "--max-new-tokens", 12, PROMPT)
    assert code == 0, err
    ids = loaded[1].encode(PROMPT)
    text, new = expected_text(loaded, ids, 12)
    assert out == text + "\n"
    last = err.strip().splitlines()[-1]
    assert STATS.fullmatch(last), last
    assert stats(last) == [(len(ids), len(new))]


def test_generate_prompt_from_stdin_and_file_no_bos(capsys, folder, loaded, monkeypatch, tmp_path):
    ids = loaded[1].encode(PROMPT, add_special_tokens=False)
    text, _ = expected_text(loaded, ids, 4)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))
    args = ("generate", "-m", folder, "--max-new-tokens", 4, "--no-bos")
    code, out, err = run(capsys, *args, "-")
    assert (code, out) == (0, text + "\n"), err
    assert stats(err) == [(len(ids), 4)]
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n")
    code, out, err = run(capsys, *args, "--quiet", "--prompt-file", tmp_path / "prompt.txt")
    assert (code, out, err) == (0, text + "\n", "")


def test_generate_stop_string_ends_after_it(capsys, folder, loaded):
    full, new = expected_text(loaded, loaded[1].encode(PROMPT), 12)
    stop = loaded[1].decode(new[3:5]).strip()[:3]
    assert stop and stop in full
    code, out, err = run(capsys, "generate", "-m", folder, "--max-new-tokens", 12, "--stop", stop, PROMPT)
    assert code == 0, err
    expected, short = expected_text(loaded, loaded[1].encode(PROMPT), 12, stop_strings=[stop], tokenizer=loaded[1])
    assert out == expected + "\n"
    assert stop in out and len(short) < 12  # the stop string is kept, generation ended early
    assert full.startswith(out.rstrip("\n"))


def test_generate_seed_reproducible(capsys, folder, loaded):
    args = ("generate", "-m", folder, "--max-new-tokens", 8, "--temperature", 1.0, "--quiet", PROMPT)
    code1, out1, _ = run(capsys, *args, "--seed", 7)
    code2, out2, _ = run(capsys, *args, "--seed", 7)
    code3, out3, _ = run(capsys, *args, "--seed", 8)
    assert code1 == code2 == code3 == 0
    assert out1 == out2 != out3
    sampled, _ = expected_text(loaded, loaded[1].encode(PROMPT), 8, do_sample=True, temperature=1.0, seed=7)
    assert out1 == sampled + "\n"


def test_generate_chat_applies_template(capsys, chat_folder, loaded):
    tok = Tokenizer.from_pretrained(chat_folder)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert tok.decode(ids).startswith("<s> [system]: Be brief.")
    text, _ = expected_text(loaded, ids, 5)
    code, out, err = run(capsys, "generate", "-m", chat_folder, "--chat", "--system", "Be brief.",
                         "--max-new-tokens", 5, "hi")  # fmt: skip
    assert (code, out) == (0, text + "\n"), err
    assert stats(err) == [(len(ids), 5)]


def test_generate_speculative_gives_the_plain_text_and_counts(capsys, folder, loaded, tmp_path):
    prompt = "one two three four one two three four one two three"
    ids = loaded[1].encode(prompt)
    text, new = expected_text(loaded, ids, 16)
    for flags in (["--prompt-lookup", 3], ["--draft-model", folder, "--draft-tokens", 3]):
        code, out, err = run(capsys, "generate", "-m", folder, "--max-new-tokens", 16, *flags, prompt)
        assert (code, out) == (0, text + "\n"), (flags, err)
        last = err.strip().splitlines()[-1]
        assert " | speculative: " in last and stats(last) == [(len(ids), len(new))], last
    # the same folder as its own draft: every draft is accepted
    assert re.search(r"speculative: (\d+)/\1 drafts accepted \(100%\)", last), last
    other = make_model_folder(tmp_path / "other", vocab_size=1000)
    code, _, err = run(capsys, "generate", "-m", folder, "--draft-model", other, prompt)
    assert code == 2
    assert_one_line_error(err, "vocab_size 1000", "the draft must share the model's tokenizer")


# ---- errors --------------------------------------------------------------------------------------


def test_missing_model_folder_is_a_one_line_usage_error(capsys, tmp_path):
    missing = tmp_path / "no" / "such-model"
    code, out, err = run(capsys, "generate", "--model", missing, "hello")
    assert code == 2 and out == ""
    assert_one_line_error(err, str(missing))


def test_folder_without_config_names_the_file(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", tmp_path, "hello")
    assert code == 2
    assert_one_line_error(err, "config.json")


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--top-p", "1.5"], "--top-p: must be in (0, 1], got 1.5"),
        (["--top-p", "nan"], "--top-p: must be in (0, 1]"),
        (["--temperature", "-1"], "--temperature: must be >= 0"),
        (["--top-k", "x"], "--top-k: expected an integer"),
        (["--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        (["--greedy", "--temperature", "0.7"], "--greedy cannot be combined with --temperature"),
        (["--greedy", "--do-sample"], "not allowed with argument"),
        (["--dtype", "int3"], "invalid choice"),
        (["--device", "nonsense"], "--device 'nonsense'"),
        (["--system", "x"], "--system needs --chat"),
        (["--prompt-lookup", "0"], "--prompt-lookup: must be >= 1"),
        (["--draft-tokens", "3"], "--draft-tokens needs --draft-model"),
        (["--prompt-lookup", "2", "--draft-model", "x"], "not allowed with argument"),
    ],
)
def test_bad_flags_are_clear_usage_errors(capsys, folder, flags, needle):
    code, out, err = run(capsys, "generate", "--model", folder, *flags, "hello")
    assert code == 2 and out == ""
    assert_one_line_error(err, needle)


def test_prompt_errors(capsys, folder, tmp_path):
    code, _, err = run(capsys, "generate", "--model", folder)
    assert code == 2
    assert_one_line_error(err, "no prompt")
    code, _, err = run(capsys, "generate", "--model", folder, "--prompt-file", tmp_path / "nope.txt")
    assert code == 2
    assert_one_line_error(err, "nope.txt", "no such file")
    code, _, err = run(capsys, "generate", "--model", folder, "--no-bos", "")
    assert code == 2
    assert_one_line_error(err, "prompt is empty")


def test_runtime_failure_exit_1_and_debug_traceback(capsys, folder, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")
        yield  # pragma: no cover

    monkeypatch.setattr(Zamba2ForCausalLM, "generate_iter", boom)
    code, _, err = run(capsys, "generate", "-m", folder, "--quiet", "hi")
    assert code == 1
    assert_one_line_error(err, "RuntimeError: kernel exploded", "--debug")
    code, _, err = run(capsys, "--debug", "generate", "-m", folder, "--quiet", "hi")
    assert code == 1 and "Traceback" in err and "kernel exploded" in err
    code, _, err = run(capsys, "generate", "-m", folder, "--quiet", "hi", "--debug")
    assert code == 1 and "Traceback" in err


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "Greedy decoding unless" in out and "--stop" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("zamba2 ")
    code, _, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err


def test_python_m_zamba2_help():
    result = subprocess.run([sys.executable, "-m", "zamba2", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("generate", "chat", "convert", "bench", "serve"):
        assert command in result.stdout


# ---- chat ----------------------------------------------------------------------------------------


def chat_ids(tok: Tokenizer, *messages: tuple[str, str]) -> list[int]:
    msgs = [{"role": role, "content": content} for role, content in messages]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)


def test_chat_keeps_history_and_reset_clears_it(capsys, chat_folder, loaded, monkeypatch):
    tok = Tokenizer.from_pretrained(chat_folder)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n\nagain\n/reset\nagain\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", "-m", chat_folder, "--max-new-tokens", 4)
    assert code == 0, err
    ids1 = chat_ids(tok, ("user", "hello"))
    a1, _ = expected_text(loaded, ids1, 4)
    ids2 = chat_ids(tok, ("user", "hello"), ("assistant", a1), ("user", "again"))
    a2, _ = expected_text(loaded, ids2, 4)
    ids3 = chat_ids(tok, ("user", "again"))
    a3, _ = expected_text(loaded, ids3, 4)
    assert out == f"{a1}\n{a2}\n{a3}\n"
    assert stats(err) == [(len(ids1), 4), (len(ids2), 4), (len(ids3), 4)]
    assert "conversation cleared" in err


def test_chat_with_speculation_answers_as_without(capsys, chat_folder, monkeypatch):
    script = "hello hello hello\nagain again\n/exit\n"
    answers = []
    for flags in ([], ["--prompt-lookup", 3], ["--draft-model", chat_folder]):
        monkeypatch.setattr(sys, "stdin", io.StringIO(script))
        code, out, err = run(capsys, "chat", "-m", chat_folder, "--max-new-tokens", 10, *flags)
        assert code == 0, err
        assert ("speculative: " in err) == bool(flags), err
        answers.append(out)
    assert answers[0] == answers[1] == answers[2]


def test_chat_ctrl_c_stops_the_answer_only(capsys, chat_folder, loaded, monkeypatch):
    tok = Tokenizer.from_pretrained(chat_folder)
    original = Zamba2ForCausalLM.generate_iter
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(1)
        for n, tokens in enumerate(original(self, *args, **kwargs)):
            if len(calls) == 1 and n == 2:
                raise KeyboardInterrupt
            yield tokens

    monkeypatch.setattr(Zamba2ForCausalLM, "generate_iter", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nagain\n"))  # then EOF
    code, out, err = run(capsys, "chat", "-m", chat_folder, "--max-new-tokens", 4)
    assert code == 0, err
    ids1 = chat_ids(tok, ("user", "hello"))
    _, new = expected_text(loaded, ids1, 4)
    partial = tok.decode(new[:2], skip_special_tokens=True)
    ids2 = chat_ids(tok, ("user", "hello"), ("assistant", partial), ("user", "again"))
    a2, _ = expected_text(loaded, ids2, 4)
    assert out == f"{partial}\n{a2}\n"
    assert stats(err) == [(len(ids1), 2), (len(ids2), 4)]
    assert "(interrupted)" in err


def test_chat_ctrl_c_at_the_prompt_exits_cleanly(capsys, chat_folder, monkeypatch):
    def ctrl_c(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c)
    code, _, err = run(capsys, "chat", "-m", chat_folder, "--quiet")
    assert code == 0 and "Traceback" not in err


def test_chat_without_template_is_a_clear_error(capsys, folder, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    code, out, err = run(capsys, "chat", "-m", folder)
    assert code == 2 and out == ""
    assert_one_line_error(err, "no chat template", str(folder))
    code, _, err = run(capsys, "generate", "-m", folder, "--chat", "hi")
    assert code == 2
    assert_one_line_error(err, "no chat template")


# ---- convert -------------------------------------------------------------------------------------


def test_convert_legacy_round_trip(capsys, tmp_path):
    from safetensors.torch import load_file, save_file
    from test_legacy import legacy_config, to_legacy
    from test_legacy import tiny as legacy_tiny

    c = legacy_tiny(2)
    published = tmp_path / "published"
    torch.manual_seed(0)
    Zamba2ForCausalLM(Zamba2Config(**c)).save_pretrained(published)
    src = tmp_path / "legacy"
    src.mkdir()
    legacy = to_legacy(load_file(published / "model.safetensors"), c, in_proj_0=True)
    save_file({k: v.contiguous() for k, v in legacy.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(legacy_config(c)))
    shutil.copyfile(published / "generation_config.json", src / "generation_config.json")
    (src / "tokenizer.model").write_bytes(b"not read by convert")

    code, out, err = run(capsys, "convert", src, tmp_path / "dst", "--quiet")
    assert (code, out, err) == (0, "", "")
    dst = tmp_path / "dst"
    assert "state_size" not in json.loads((dst / "config.json").read_text())
    assert (dst / "tokenizer.model").read_bytes() == b"not read by convert"
    assert not any(".blocks." in k or "mamba_layers" in k for k in load_file(dst / "model.safetensors"))
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 1]])
    with torch.no_grad():
        want = Zamba2ForCausalLM.from_pretrained(src, progress=False)(ids).logits
        got = Zamba2ForCausalLM.from_pretrained(dst, progress=False)(ids).logits
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # the converted folder is an ordinary upstream checkpoint: transformers 5.23 loads it to the same logits
    import transformers

    with torch.no_grad():
        theirs = transformers.Zamba2ForCausalLM.from_pretrained(dst).eval()(ids).logits
    torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)

    code, _, err = run(capsys, "convert", src, tmp_path / "dst-bf16", "--dtype", "bf16")
    assert code == 0 and "bfloat16" in err and "tokenizer.model" in err
    assert json.loads((tmp_path / "dst-bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_convert_errors(capsys, folder, tmp_path):
    code, _, err = run(capsys, "convert", folder, folder)
    assert code == 2
    assert_one_line_error(err, "different folder")
    (tmp_path / "file").write_text("x")
    code, _, err = run(capsys, "convert", folder, tmp_path / "file")
    assert code == 2
    assert_one_line_error(err, "is a file")


# ---- delegated commands --------------------------------------------------------------------------


def test_bench_and_serve_delegate(capsys, monkeypatch):
    import types

    seen = {}
    fake = types.ModuleType("zamba2.bench")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 3
    monkeypatch.setitem(sys.modules, "zamba2.bench", fake)
    assert cli.main(["bench", "--arch", "tiny", "--debug"]) == 3
    assert seen["argv"] == ["--arch", "tiny", "--debug"]

    monkeypatch.setitem(sys.modules, "zamba2.serve", None)  # as if the module were absent
    code, _, err = run(capsys, "serve", "--port", "8000")
    assert code == 1
    assert_one_line_error(err, "'zamba2 serve' is not available")

    def no_fastapi(name):
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    monkeypatch.setattr(cli.commands.importlib, "import_module", no_fastapi)
    code, _, err = run(capsys, "serve")
    assert code == 1
    assert_one_line_error(err, "needs 'fastapi'", "pip install 'zamba2[serve]'")
