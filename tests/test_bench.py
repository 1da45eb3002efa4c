"""The benchmark script: smoke runs on the tiny preset (no timing assertions), and the weight copy into the
transformers reference, which every comparison it prints depends on."""

import importlib.util
import json

import pytest
import torch

from zamba2 import bench
from zamba2.config import Zamba2Config

# One thread: two-thread runs on a busy shared machine spend most of their time in OpenMP barriers.
SMOKE = ["--arch", "tiny", "--lengths", "16,32", "--decode-steps", "4", "--repeats", "1", "--batched", "2",
         "--threads", "1"]  # fmt: skip
needs_transformers = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None, reason="transformers is not installed"
)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread here (main() sets it too), and the other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(tmp_path, *extra: str) -> dict:
    path = tmp_path / "bench.json"
    assert bench.main([*SMOKE, "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def check_implementation(res: dict) -> None:
    for n in ("16", "32"):
        entry = res["prefill"][n]
        assert entry["tokens"] == int(n) and entry["seconds"] > 0 and entry["tokens_per_s"] > 0
        assert len(entry["runs"]) == 1
    assert res["ttft"]["prompt"] == 512 and res["ttft"]["seconds"] > 0
    for name, batch in (("decode", 1), ("batched_decode", 2)):
        entry = res[name]
        assert entry["batch"] == batch and entry["steps"] == 4 and entry["prompt"] == 128
        assert entry["tokens_per_s"] > 0 and entry["bound_tokens_per_s"] > 0 and entry["bound_fraction"] > 0
    assert res["batched_decode"]["vs_decode"] > 0
    memory = res["memory"]
    assert memory["peak_rss_bytes"] >= memory["batch1_peak_rss_bytes"] >= memory["import_rss_bytes"] > 0
    assert set(memory["phase_peak_rss_bytes"]) >= {"import", "build", "prefill", "decode", "batched_decode"}
    assert memory["weight_bytes"] == res["model"]["weight_bytes"] > 0
    assert res["model"]["streamed_bytes"] > 0 and res["model"]["params"] > 0


def test_smoke_ours_in_process(tmp_path, capsys):
    report = run(tmp_path, "--no-subprocess", "--load", "--quantize", "int8")
    assert set(report) >= {"schema", "args", "machine", "config", "bandwidth", "results", "load", "notes"}
    assert list(report["results"]) == ["ours"] and "speedup" not in report
    check_implementation(report["results"]["ours"])
    machine = report["machine"]
    assert machine["cores"] > 0 and machine["threads"] > 0 and machine["torch"] and machine["date"]
    assert report["bandwidth"]["gb_per_s"] > 0 and report["bandwidth"]["buffer_bytes"] > 0
    assert report["results"]["ours"]["model"]["quantize"]["mode"] == "int8"
    load = report["load"]
    if "skipped" not in load:
        assert load["load_s"] > 0 and load["weights_bytes"] > 0 and load["peak_rss_bytes"] > 0
    out = capsys.readouterr().out
    assert "prefill 16 (tok/s)" in out and "decode batch 2" in out


def test_vs_float_measures_the_unquantised_model_in_the_same_run(tmp_path, capsys):
    report = run(tmp_path, "--no-subprocess", "--quantize", "int8", "--vs-float", "--batched", "0")
    assert list(report["results"]) == ["ours", "float"]
    assert report["results"]["float"]["model"]["quantize"] is None
    assert report["vs_float"]["decode"] > 0 and set(report["vs_float"]["prefill"]) == {"16", "32"}
    assert "int8 / unquantised: prefill" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main([*SMOKE, "--vs-float"])  # nothing to compare without --quantize


@needs_transformers
def test_smoke_compare_in_process(tmp_path):
    report = run(tmp_path, "--no-subprocess", "--compare", "--dtype", "fp32")
    assert list(report["results"]) == ["ours", "ref"]
    for res in report["results"].values():
        check_implementation(res)
    speedup = report["speedup"]
    assert set(speedup["prefill"]) == {"16", "32"} and all(v > 0 for v in speedup["prefill"].values())
    assert speedup["ttft"] > 0 and speedup["decode"] > 0 and speedup["batched_decode"] > 0
    # the bandwidth: the buffer before the run, then one sample per implementation and repeat
    assert [s["where"] for s in report["bandwidth"]["samples"]] == [
        "buffer, before the run", "ours weights, repeat 1", "ref weights, repeat 1"
    ]  # fmt: skip
    assert report["bandwidth"]["gb_per_s"] == max(s["gb_per_s"] for s in report["bandwidth"]["samples"])
    assert speedup["peak_rss_ratio"] > 0 and speedup["batch1_peak_rss_ratio"] > 0
    # the same weights: the reference repeats the shared blocks, but streams no more distinct bytes
    ours, ref = report["results"]["ours"]["model"], report["results"]["ref"]["model"]
    assert ours["params"] == ref["params"]


def test_worker_subprocess(tmp_path):
    """The default mode: the measurement runs in a fresh `--worker` process, so RSS is its own."""
    path = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--lengths", "16", "--decode-steps", "2", "--repeats", "1", "--batched", "0",
            "--threads", "1"]  # fmt: skip
    assert bench.main([*argv, "--only", "ours", "--json", str(path)]) == 0
    res = json.loads(path.read_text())["results"]["ours"]
    assert res["memory"]["shared_process"] is False and res["memory"]["peak_rss_bytes"] > 0
    assert res["decode"]["tokens_per_s"] > 0 and "batched_decode" not in res


@needs_transformers
@pytest.mark.parametrize("num_mem_blocks", [1, 2])
def test_reference_gets_our_weights(num_mem_blocks):
    """Both builders give the same function: the reference's repeated shared blocks hold block j % nmb."""
    config = Zamba2Config.preset(
        "tiny",
        num_mem_blocks=num_mem_blocks,
        layers_block_type=["mamba", "hybrid", "hybrid", "mamba", "hybrid", "mamba"],
    )
    ours = bench.build_ours(config, torch.float32, seed=3)
    ref = bench.build_reference(config, torch.float32, seed=3)
    assert torch.get_default_dtype() == torch.float32
    ids = torch.randint(3, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = ours(ids, use_cache=False).logits
        b = ref(ids, use_cache=False).logits
    diff = (a - b).abs().max().item()
    assert diff < 1e-4, f"max |ours - reference| = {diff}"
    assert bench.streamed_bytes(ours) == bench.weight_bytes(ours)  # tied lm_head counted once


def test_build_ours_is_deterministic_and_in_dtype():
    config = Zamba2Config.preset("tiny")
    a, b = bench.build_ours(config, torch.bfloat16), bench.build_ours(config, torch.bfloat16)
    assert {p.dtype for p in a.parameters()} == {torch.bfloat16}
    assert a.lm_head.weight is a.model.embed_tokens.weight
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


def test_bad_lengths_name_the_flag(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--lengths", "16,-2"])
    assert "--lengths" in capsys.readouterr().err


def test_streamed_bytes_count_quantized_layers_as_stored():
    quant = pytest.importorskip("zamba2.quant")
    model = bench.build_ours(Zamba2Config.preset("tiny"), torch.float32)
    emb = model.model.embed_tokens.weight
    floats = bench.weight_bytes(model) - emb.numel() * emb.element_size()
    linears = {id(m): m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head}
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears.values())
    quant.quantize_model(model, "int8", include=lambda name, m: isinstance(m, torch.nn.Linear))
    qlinears = {id(m): m for m in model.modules() if isinstance(m, quant.QuantizedLinear)}
    assert len(qlinears) == len(linears) + 1  # the tied lm_head too, quantised from the embedding
    expected = floats - linear_bytes + sum(m.weight_bytes() for m in qlinears.values())
    # the float embedding table now only serves lookups: one row per token
    assert bench.streamed_bytes(model) == expected + emb.shape[1] * emb.element_size()


def test_quality_report_on_tiny(tmp_path):
    from zamba2 import bench

    out = tmp_path / "q.json"
    assert bench.main(["--arch", "tiny", "--quality", "32", "--json", str(out)]) == 0
    import json

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"bf16 vs fp32", "int8 vs bf16", "int4 vs bf16"}
    assert all(0 <= r["top1_agreement"] <= 1 and r["relative_logit_error"] >= 0 for r in results.values())


def test_reread_bytes_counts_quantised_split_qkv():
    """Later uses of a shared block stream half of q/k/v, float or quantised (whose codes are smaller)."""
    config = Zamba2Config.preset("tiny", hidden_size=128, layers_block_type=["hybrid", "mamba", "hybrid"],
                                 num_hidden_layers=3, num_mem_blocks=1)  # fmt: skip
    model = bench.build_ours(config, torch.bfloat16)
    float_bytes = bench.reread_bytes(model)
    model.quantize("int8")
    attn = model.model.layers[0].shared_transformer.self_attn
    assert type(attn.q_proj).__name__ == "QuantizedLinear" and attn.can_split
    assert 0 < bench.reread_bytes(model) < float_bytes


def test_kernel_micro_benchmark_runs(capsys, monkeypatch):
    from zamba2.bench import kernels

    monkeypatch.setattr(kernels, "SHAPES_1_2B", [(64, 256)])
    assert kernels.main(["--iters", "2"]) == 0
    assert "64x256" in capsys.readouterr().out
