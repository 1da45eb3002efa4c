"""Serving engine without HTTP: batch row operations, continuous batching == each prompt alone, prompt-state
reuse == no reuse, per-request sampling, cancellation, back-pressure."""

from __future__ import annotations

import pytest
import torch

from zamba2.cache import HybridCache
from zamba2.config import Zamba2Config
from zamba2.model import Zamba2ForCausalLM
from zamba2.sampling import SamplingParams
from zamba2.serve import batch as batching
from zamba2.serve.engine import Engine, Failure, GenerationRequest, Output, Progress, QueueFull
from zamba2.serve.prompt_cache import PromptCache

VOCAB = 256


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # GQA + rope + adapters: every per-row piece of the cache (K/V, positions, conv, SSM) matters.
    config = Zamba2Config.preset("tiny", vocab_size=VOCAB, num_key_value_heads=2, chunk_size=8)
    return Zamba2ForCausalLM(config).eval()


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def alone(model, ids: list[int], n: int, **kw) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[], **kw)
    return out[0, len(ids) :].tolist()


class Collect:
    """A sink that keeps every event of one request."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    @property
    def outputs(self) -> list[Output]:
        return [e for e in self.events if isinstance(e, Output)]

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]

    @property
    def done(self) -> bool:
        return any(isinstance(e, Failure) for e in self.events) or any(o.finish_reason for o in self.outputs)


def submit(engine: Engine, ids: list[int], n: int, **kw) -> Collect:
    sink = Collect()
    engine.submit(GenerationRequest(ids, max_tokens=n, ignore_eos=True, **kw), sink)
    return sink


def run(engine: Engine, sinks: list[Collect], limit: int = 500) -> None:
    for _ in range(limit):
        if all(s.done for s in sinks):
            return
        engine.step()
    raise AssertionError("engine did not finish within the step limit")


# ---- batch row operations ------------------------------------------------------------------------


def prefilled(model, ids: list[int]) -> tuple[HybridCache, torch.Tensor]:
    cache = HybridCache(model.config, 1, len(ids))
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, logits_to_keep=1).logits[:, -1]
    return cache, logits


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh", "state-rows"])
@torch.no_grad()
def test_insert_drop_compact_keep_each_rows_numbers(model, pooled):
    """Rows of different lengths joined into one batch step exactly like each row alone; dropping the long
    row compacts the shared columns and the others keep going unchanged. With preallocated state rows the
    states stay in the pool, and the row after the dropped one moves down into its place."""
    ids = [prompt(n, seed) for n, seed in ((5, 1), (19, 2), (9, 3))]
    singles = [prefilled(model, p) for p in ids]
    pool = batching.StateRows(model.config, 4, torch.float32) if pooled else None
    batch = batching.insert_rows(None, [singles[0][0]], capacity=8, pool=pool)
    batch = batching.insert_rows(batch, [singles[1][0], singles[2][0]], capacity=30, pool=pool)
    if pooled:
        assert pool.holds(batch) and batch.ssm_states.shape[1] == 3
        torch.testing.assert_close(pool.ssm[:, 2], singles[2][0].ssm_states[:, 0])
    assert batch.seq_len == 19 and batch.batch_size == 3 and batch.max_length >= 30
    assert batching.row_lengths(batch) == [5, 19, 9]
    assert not batch.key_mask[0, :14].any() and batch.key_mask[0, 14:19].all()
    tokens = torch.stack([lg.argmax(-1)[0] for _, lg in singles])
    for step in range(6):
        if step == 3:  # the longest row leaves: 10 leading columns are padding everywhere now
            batch = batching.drop_rows(batch, [0, 2], pool=pool)
            assert batch.seq_len == 9 + step and batching.leading_padding(batch) == 0
            assert pool is None or pool.holds(batch)
            singles, tokens = [singles[0], singles[2]], tokens[[0, 2]]
        logits = model(tokens[:, None], past_key_values=batch, logits_to_keep=1).logits[:, -1]
        for row, (cache, _) in enumerate(singles):
            ref = model(tokens[row].view(1, 1), past_key_values=cache, logits_to_keep=1).logits[:, -1]
            diff = (logits[row] - ref[0]).abs().max().item()
            assert diff < 1e-4, f"step {step} row {row}: max diff {diff}"
        tokens = logits.argmax(-1)


@torch.no_grad()
def test_extract_row_resume_and_compact():
    torch.manual_seed(1)
    config = Zamba2Config.preset("tiny", vocab_size=VOCAB)
    m = Zamba2ForCausalLM(config).eval()
    a, b = prefilled(m, prompt(4, 5))[0], prefilled(m, prompt(7, 6))[0]
    batch = batching.insert_rows(None, [a, b])
    snap = batching.extract_row(batch, 0)
    assert snap.seq_len == 4 and snap.max_length == 4 and not snap.has_padding
    torch.testing.assert_close(snap.keys, a.keys[:, :, :, :4])
    torch.testing.assert_close(snap.ssm_states, a.ssm_states)
    assert int(snap.positions[0]) == 4
    resumed = batching.resume(snap, 10)
    assert resumed.max_length == 10 and resumed.seq_len == 4
    resumed.ssm_states.add_(1.0)  # a private copy: the snapshot is unchanged
    torch.testing.assert_close(snap.ssm_states, a.ssm_states)
    # in-place compact after the long row is masked out by hand
    batch.key_mask[1, :3] = False
    assert batching.compact(batch) == 3 and batch.seq_len == 4


def test_prompt_cache_lookup_and_lru():
    torch.manual_seed(2)
    config = Zamba2Config.preset("tiny", vocab_size=VOCAB)

    def snap(n: int) -> HybridCache:
        cache = HybridCache(config, 1, n)
        cache.seq_len = n
        return cache

    pc = PromptCache(capacity_bytes=sum(snap(n).memory_bytes() for n in (4, 2, 3)) - 1)
    pc.put([1, 2, 3, 4], snap(4))
    assert pc.lookup([1, 2, 3, 4]) is None  # a strict prefix only: one token must be left to run...
    pc.put([1, 2, 3, 4], snap(4), logits=torch.zeros(VOCAB))
    assert pc.lookup([1, 2, 3, 4]).tokens == (1, 2, 3, 4)  # ...unless the logits after it were kept
    pc.put([1, 2, 3, 4], snap(4))
    assert pc.lookup([1, 2, 3, 4, 5]).tokens == (1, 2, 3, 4)
    assert pc.lookup([1, 2, 9, 4, 5]) is None
    pc.put([1, 2], snap(2))
    assert pc.lookup([1, 2, 3, 4, 5, 6]).tokens == (1, 2, 3, 4)  # the longest match wins
    pc.put([7, 7, 7], snap(3))  # over the byte bound: the least recently used entry goes
    assert len(pc) == 2 and pc.bytes <= pc.capacity_bytes
    assert pc.lookup([1, 2, 5]) is None
    assert (pc.hits, pc.misses) == (3, 3)


# ---- engine --------------------------------------------------------------------------------------


def test_sequences_joining_at_different_times_match_generating_alone(model):
    engine = Engine(model, max_concurrency=8, prefill_chunk=8)
    specs = [(6, 11, 12), (23, 12, 5), (3, 13, 9), (15, 14, 14), (9, 15, 1)]  # (prompt len, seed, new tokens)
    sinks: list[Collect] = []
    for n, seed, new in specs:  # one more request every second iteration, while the others decode
        sinks.append(submit(engine, prompt(n, seed), new))
        engine.step()
        engine.step()
    run(engine, sinks)
    for (n, seed, new), sink in zip(specs, sinks, strict=True):
        assert sink.tokens == alone(model, prompt(n, seed), new), f"prompt of {n} tokens"
        assert sink.outputs[-1].finish_reason == "length"
        assert sink.outputs[-1].completion_tokens == new and sink.outputs[-1].prompt_tokens == n
    # the 23-token prompt was prefilled in chunks of at most 8 (shared with the 3-token prompt that arrived
    # meanwhile) and reported progress
    assert sum(isinstance(e, Progress) for e in sinks[1].events) >= 2
    assert engine.active == 0 and engine.outstanding == 0 and engine._batch is None


def test_prompt_cache_hit_gives_the_same_tokens_as_a_miss(model):
    engine = Engine(model, prefill_chunk=16, prompt_cache_bytes=64 << 20)
    first = prompt(20, 21)
    turn1 = submit(engine, first, 6)
    run(engine, [turn1])
    # the next "turn": the previous prompt + answer, then new tokens
    second = first + turn1.tokens + prompt(7, 22)
    turn2 = submit(engine, second, 8)
    run(engine, [turn2])
    assert turn2.outputs[-1].cached_tokens == len(first) + 5  # the answer's last token was never fed
    assert engine.prompt_cache.hits == 1
    assert turn2.tokens == alone(model, second, 8)
    # a prompt that diverges inside a stored one falls back to the longest true prefix (the first prompt)
    third = first + [first[0]] + prompt(3, 23)
    turn3 = submit(engine, third, 4)
    run(engine, [turn3])
    assert turn3.outputs[-1].cached_tokens == len(first)
    assert turn3.tokens == alone(model, third, 4)


def test_per_request_sampling_seeds_and_penalties(model):
    engine = Engine(model, max_concurrency=4, prefill_chunk=32)
    ids = prompt(8, 31)
    sampled = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    penalised = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4)
    sinks = [
        submit(engine, ids, 10, params=sampled, seed=5),
        submit(engine, ids, 10),  # greedy, batched with the sampled rows
        submit(engine, ids, 10, params=penalised),
        submit(engine, ids, 10, params=sampled, seed=5),
    ]
    run(engine, sinks)
    expected_sampled = alone(model, ids, 10, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=5)
    assert sinks[0].tokens == expected_sampled == sinks[3].tokens
    assert sinks[1].tokens == alone(model, ids, 10)
    assert sinks[2].tokens == alone(model, ids, 10, repetition_penalty=1.3, presence_penalty=0.5,
                                    frequency_penalty=0.4)  # fmt: skip


def test_logprobs_are_the_models(model):
    engine = Engine(model)
    ids = prompt(5, 41)
    sink = submit(engine, ids, 3, logprobs=4)
    run(engine, [sink])
    with torch.no_grad():
        full = torch.tensor([ids + sink.tokens])
        lps = torch.log_softmax(model(full).logits[0, len(ids) - 1 : -1].float(), -1)  # (3, V)
    entries = [e for o in sink.outputs for e in o.logprobs]
    for t, entry in enumerate(entries):
        assert abs(entry.logprob - lps[t, entry.token_id].item()) < 1e-4
        assert [i for i, _ in entry.top] == lps[t].topk(4).indices.tolist()


def test_eos_stops_and_cancel_frees_the_row(model):
    ids = prompt(6, 51)
    free = alone(model, ids, 6)
    engine = Engine(model, eos_token_ids=[free[2]])
    stopped = Collect()
    engine.submit(GenerationRequest(ids, max_tokens=6), stopped)
    long = submit(engine, prompt(4, 52), 1000)
    for _ in range(6):
        engine.step()
    assert stopped.tokens == free[: free.index(free[2]) + 1] and stopped.outputs[-1].finish_reason == "stop"
    assert engine.active == 1 and not long.done
    rid = engine._running[0].id
    engine.cancel(rid)
    engine.step()  # the row leaves before this step's decode
    assert engine.active == 0 and engine.outstanding == 0 and engine._batch is None
    assert engine.stats.cancelled == 1
    # cancelled while its prompt is still being prefilled
    engine = Engine(model, prefill_chunk=4)
    submit(engine, prompt(20, 53), 5)
    engine.step()
    engine.cancel(engine._prefilling[0].id)
    engine.step()
    assert engine.active == 0 and engine.outstanding == 0


def test_queue_bound_and_concurrency_limit(model):
    engine = Engine(model, max_concurrency=2, max_queue=1)
    sinks = [submit(engine, prompt(3, 60 + i), 3) for i in range(3)]
    with pytest.raises(QueueFull):
        submit(engine, prompt(3, 70), 3)
    engine.step()
    assert engine.active == 2 and engine.queue_depth == 1
    run(engine, sinks)
    assert engine.outstanding == 0 and engine.stats.rejected == 1
    one = submit(engine, prompt(3, 71), 1)  # finishes at the end of its prefill, never joins the batch
    run(engine, [one])
    assert len(one.tokens) == 1 and one.outputs[-1].finish_reason == "length" and engine._batch is None
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(GenerationRequest([1, 2], max_tokens=0), Collect())
    with pytest.raises(ValueError, match="prompt_ids"):
        engine.submit(GenerationRequest([VOCAB + 5], max_tokens=1), Collect())


def test_engine_thread_serves_and_stops(model):
    import queue

    engine = Engine(model)
    engine.start()
    try:
        events: queue.Queue = queue.Queue()
        engine.submit(GenerationRequest(prompt(4, 81), max_tokens=5, ignore_eos=True), events.put)
        got = []
        while not got or got[-1].finish_reason is None:
            got.append(events.get(timeout=30))
        assert [t for o in got for t in o.token_ids] == alone(model, prompt(4, 81), 5)
    finally:
        engine.stop()


def test_bench_runs_on_the_tiny_architecture():
    from zamba2.serve import bench

    args = bench.build_parser().parse_args(
        ["--arch", "tiny", "--dtype", "float32", "--device", "cpu", "--streams", "1", "2", "--prompt-tokens", "4",
         "--decode-tokens", "6", "--history", "40", "--answer-tokens", "3", "--turn-tokens", "5"]
    )  # fmt: skip
    report = bench.measure(args)
    assert set(report["decode_tokens_per_s"]) == {"1", "2"} and report["decode_speedup"]["2"] > 0
    assert report["second_turn"]["identical_greedy_output"] and report["second_turn"]["history_tokens"] == 43
    assert "TTFT with prompt cache" in bench.format_report(report)


# ---- failures, limits, fairness, shutdown --------------------------------------------------------


def test_fair_shares_give_every_prompt_a_part_of_the_budget():
    from zamba2.serve.engine import fair_shares

    assert fair_shares([10, 5000], 256) == [10, 246]
    assert fair_shares([5000, 5000], 256) == [128, 128]
    assert fair_shares([5000, 3, 40], 64) == [31, 3, 30]
    assert fair_shares([7, 7, 7], 2) == [1, 1, 0]
    assert sum(fair_shares([900, 800, 700], 256)) == 256


@pytest.fixture(scope="module")
def poisoned():
    """An untied tiny model whose embedding of one token is NaN, and that token: it is the third token the
    greedy continuation of prompt(6, 91) produces, so that request breaks in its third decode step, with real
    NaN logits in its own batch row only."""
    torch.manual_seed(3)
    config = Zamba2Config.preset("tiny", vocab_size=VOCAB, num_key_value_heads=2, tie_word_embeddings=False)
    m = Zamba2ForCausalLM(config).eval()
    bad = alone(m, prompt(6, 91), 4)[2]
    assert bad not in prompt(6, 91) and bad not in alone(m, prompt(6, 91), 4)[:2]
    with torch.no_grad():
        m.model.embed_tokens.weight[bad] = float("nan")
    return m, bad


def clean_prompt(poisoned, n: int, seed: int) -> list[int]:
    """A prompt of n tokens without the poisoned token, whose greedy continuation avoids it too."""
    model, bad = poisoned
    while bad in prompt(n, seed) or bad in alone(model, prompt(n, seed), 12):
        seed += 1000
    return prompt(n, seed)


def test_a_request_failing_mid_decode_leaves_the_batch_alone(poisoned):
    model, bad = poisoned
    engine = Engine(model, max_concurrency=4, prefill_chunk=16)
    sampled = SamplingParams(do_sample=True, temperature=0.8, top_k=20)
    greedy_ids, sampled_ids = clean_prompt(poisoned, 9, 92), clean_prompt(poisoned, 5, 93)
    expected = alone(model, greedy_ids, 12), alone(model, sampled_ids, 12, do_sample=True, temperature=0.8,
                                                       top_k=20, seed=4)  # fmt: skip
    assert bad not in expected[0] + expected[1]
    streams = [submit(engine, greedy_ids, 12), submit(engine, sampled_ids, 12, params=sampled, seed=4)]
    engine.step()
    engine.step()  # both are decoding when the failing request joins
    failing = submit(engine, prompt(6, 91), 8)
    run(engine, [*streams, failing])
    assert [s.tokens for s in streams] == list(expected)
    assert isinstance(failing.events[-1], Failure) and "not finite" in failing.events[-1].message
    assert len(failing.tokens) == 3  # it failed in its third decode step, after emitting three tokens
    assert engine.outstanding == 0 and engine.untracked == 0 and engine.stats.failed == 1
    # a request whose sampling breaks (parameters made invalid behind the validator's back) fails alone too
    later = submit(engine, greedy_ids, 6)
    broken_params = SamplingParams(do_sample=True)
    broken = submit(engine, sampled_ids, 6, params=broken_params, seed=1)
    engine.step()
    assert len(engine._running) == 2 and broken.tokens
    broken_params.temperature = float("nan")
    run(engine, [later, broken])
    assert later.tokens == expected[0][:6] and isinstance(broken.events[-1], Failure)
    assert engine.health() == {"outstanding": 0, "active": 0, "queued": 0, "untracked": 0, "alive": True,
                               "stalled_s": 0.0}  # fmt: skip


def test_a_prompt_with_non_finite_logits_fails_and_frees_its_slot(poisoned):
    """The bug behind the wedge: a failure at the first sample lost the request and its slot for good."""
    model, bad = poisoned
    engine = Engine(model, max_concurrency=1, max_queue=0)
    for _ in range(3):  # one slot: a leak would make the next submit raise QueueFull
        sink = submit(engine, clean_prompt(poisoned, 4, 94) + [bad], 4)
        run(engine, [sink])
        assert isinstance(sink.events[-1], Failure) and not sink.tokens
    ok = submit(engine, clean_prompt(poisoned, 4, 94), 4)
    run(engine, [ok])
    assert ok.tokens == alone(model, clean_prompt(poisoned, 4, 94), 4)
    assert engine.outstanding == 0 and engine.untracked == 0


def test_tiny_temperatures_and_penalties_sample_without_failing(model):
    engine = Engine(model, max_concurrency=4)
    ids = prompt(7, 95)
    sinks = [
        submit(engine, ids, 6, params=SamplingParams(do_sample=True, temperature=1e-40), seed=1),
        submit(engine, ids, 6, params=SamplingParams(do_sample=True, temperature=1e-300, top_p=1e-9), seed=2),
        submit(engine, ids, 6, params=SamplingParams(do_sample=True, repetition_penalty=1e-300, min_p=1.0), seed=3),
    ]
    run(engine, sinks)
    assert all(not isinstance(s.events[-1], Failure) for s in sinks)
    assert sinks[0].tokens == sinks[1].tokens == alone(model, ids, 6)  # temperature -> 0 is greedy
    assert len(sinks[2].tokens) == 6 and engine.stats.failed == 0


def test_identical_prompt_resent_hits_the_prompt_cache(model):
    engine = Engine(model, prefill_chunk=16, prompt_cache_bytes=64 << 20)
    ids = prompt(21, 96)
    first = submit(engine, ids, 5, logprobs=2)
    run(engine, [first])
    prefilled = engine.stats.prompt_tokens
    again = submit(engine, ids, 5, logprobs=2)
    run(engine, [again])
    assert engine.stats.prompt_tokens == prefilled  # no prompt token ran through the model again
    assert again.outputs[-1].cached_tokens == 21 and engine.prompt_cache.hits == 1
    assert again.tokens == first.tokens == alone(model, ids, 5)
    lp = [[e.logprob for o in s.outputs for e in o.logprobs] for s in (first, again)]
    assert max(abs(a - b) for a, b in zip(*lp, strict=True)) < 1e-5


def test_a_short_prompt_behind_a_long_one_starts_within_a_few_chunks(model):
    engine = Engine(model, prefill_chunk=16)
    long = submit(engine, prompt(400, 97), 2)
    engine.step()
    short = submit(engine, prompt(5, 98), 2)
    for _ in range(2):
        engine.step()
    assert short.tokens and not long.tokens  # a first-come prefill would take 25 steps before it
    run(engine, [long, short])
    assert long.tokens == alone(model, prompt(400, 97), 2) and short.tokens == alone(model, prompt(5, 98), 2)


def test_context_limit_close_and_abort(model):
    from zamba2.serve.engine import ShuttingDown

    engine = Engine(model, max_model_len=32)
    with pytest.raises(ValueError, match=r"\(30 tokens\) \+ max_tokens \(3\) = 33 tokens .* context of 32"):
        engine.submit(GenerationRequest(prompt(30, 99), max_tokens=3), Collect())
    running, waiting = submit(engine, prompt(4, 100), 28), submit(engine, prompt(4, 101), 28)
    engine.max_concurrency = 1
    engine.step()
    engine.close()
    with pytest.raises(ShuttingDown):
        submit(engine, prompt(4, 102), 2)
    engine.step()
    assert running.tokens and not running.done  # close() lets outstanding requests go on
    engine.abort()
    engine.step()
    for sink in (running, waiting):
        assert isinstance(sink.events[-1], Failure) and sink.events[-1].shutdown
    assert engine.outstanding == 0 and engine.stats.failed == 0


def test_scored_prompts_equal_score_tokens_bitwise_under_load(model):
    """bf16: the logprobs of scored prompts do not depend on what else the engine is prefilling."""
    from zamba2.eval.scoring import score_tokens

    bf16 = Zamba2ForCausalLM(model.config).eval()
    bf16.load_state_dict(model.state_dict())
    bf16.to(torch.bfloat16)
    engine = Engine(bf16, prefill_chunk=16)  # fair shares of 16 tokens would split every prompt differently
    prompts = [prompt(n, seed) for n, seed in ((70, 1), (45, 2), (90, 3))]
    sinks = [submit(engine, ids, 1, prompt_logprobs=0) for ids in prompts]
    sinks.append(submit(engine, prompt(60, 4), 3))  # a plain prompt prefilled beside them
    run(engine, sinks)
    for ids, sink in zip(prompts, sinks, strict=False):
        got = [t.logprob for t in sink.outputs[0].prompt_logprobs]
        assert got == score_tokens(bf16, ids).logprobs.tolist()
