"""The training benchmark: a smoke run on a tiny slice (no timing assertions) and the GEMM floor's shapes."""

import importlib.util
import json

import pytest
import torch

from zamba2.bench import train
from zamba2.bench.models import build_ours


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_smoke_tiny_slice(tmp_path, capsys):
    path = tmp_path / "train.json"
    argv = ["--arch", "tiny", "--layers", "2", "--tokens", "16", "--repeats", "1", "--threads", "1", "--no-adamw"]
    assert train.main([*argv, "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"]
    for impl in ("ours", "ref"):
        r = res[impl]
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] > 0
        assert r["peak_rss_bytes"] > r["weight_bytes"] > 0
    assert res["ours"]["gemm_floor_s"] > 0 and res["speedup"] > 0 and res["rss_ratio"] > 0
    assert "speed-up" in capsys.readouterr().out


def test_adamw_runner_times_each_implementation():
    args = train.build_parser().parse_args(["--arch", "tiny", "--layers", "2"])
    runner = train.AdamWRunner(args)
    assert runner.info["params"] > 0
    for _ in range(2):  # both orders
        times = runner.repeat()
        assert set(times) == set(train.OPTIMIZERS) and min(times.values()) > 0


def test_linear_calls_cover_every_product():
    """Every linear application of a forward: 2 per Mamba mixer, q/k/v/o with their adapters, the MLP with its
    adapter, the hybrid layer's linear and lm_head, each over all tokens."""
    config = train.slice_config(2, "tiny")
    model = build_ours(config, torch.float32)
    calls = train.linear_calls(model, torch.randint(3, 100, (1, 8)))
    H, W = config.hidden_size, config.attention_hidden_size
    assert len(calls) == 2 * 2 + 4 + 3 * 2 + 2 + 2 + 1 + 1
    assert all(rows == 8 for rows, _, _, _ in calls)
    assert (8, H, config.vocab_size, False) in calls  # lm_head (random bench weights are frozen)
    assert sum(1 for _, k, n, _ in calls if (k, n) == (W, W)) == 3  # q, k, v over the whole 2H input
    floor = train.gemm_floor(calls)
    assert floor["seconds"] > 0 and floor["flops"] == sum(2 * r * k * n * 2 for r, k, n, _ in calls)


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        train.main(["--tokens", "1"])
    assert "--tokens must be >= 2" in capsys.readouterr().err
