"""Speculative decoding: exact cache rollback, greedy == plain greedy, the sampled distribution, the API's errors."""

import math

import pytest
import torch
from reference import maxdiff, small_kwargs

from zamba2.config import Zamba2Config
from zamba2.generation import decode_step, prefill
from zamba2.generation_config import GenerationConfig
from zamba2.model import Zamba2ForCausalLM
from zamba2.sampling import SamplingParams
from zamba2.speculative import (
    DraftModel,
    PromptLookup,
    SpeculationStats,
    Speculator,
    accept,
)

CONFIGS = {
    "rope+adapters, 1 block": dict(use_mem_rope=True, use_shared_attention_adapter=True, num_mem_blocks=1),
    "GQA, 2 blocks, ngroups 2": dict(num_key_value_heads=2, num_mem_blocks=2, mamba_ngroups=2, chunk_size=3,
                                     use_mem_rope=True),
    "time_step_limit set": dict(time_step_limit=(0.01, 0.05)),
}  # fmt: skip
VOCAB = 32  # small, so that random models repeat themselves and n-gram drafts get partly accepted
TOL = 1e-6


def build(seed: int = 0, **kw) -> Zamba2ForCausalLM:
    torch.manual_seed(seed)
    return Zamba2ForCausalLM(Zamba2Config(**small_kwargs(**{"vocab_size": VOCAB, **kw}))).eval()


def perturbed(model: Zamba2ForCausalLM, scale: float, seed: int = 1) -> Zamba2ForCausalLM:
    """The model with noise on every weight: a draft that agrees with it often, not always."""
    draft = Zamba2ForCausalLM(model.config).eval()
    draft.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    return draft


def repetitive(n: int = 4, period: int = 6, seed: int = 2) -> torch.Tensor:
    pattern = torch.randint(3, VOCAB, (period,), generator=torch.Generator().manual_seed(seed))
    return pattern.repeat(n)[None]


@pytest.fixture(params=list(CONFIGS), scope="module")
def model(request):
    return build(**CONFIGS[request.param])


def cache_diff(a, b) -> float:
    """Largest difference between two caches: conv/SSM states, K/V up to seq_len, positions (seq_len equal)."""
    assert a.seq_len == b.seq_len, (a.seq_len, b.seq_len)
    S = a.seq_len
    return max(
        maxdiff(a.conv_states, b.conv_states), maxdiff(a.ssm_states, b.ssm_states),
        maxdiff(a.keys[:, :, :, :S], b.keys[:, :, :, :S]), maxdiff(a.values[:, :, :, :S], b.values[:, :, :, :S]),
        maxdiff(a.positions, b.positions),
    )  # fmt: skip


def plain_cache(model, ids: torch.Tensor, n_prompt: int):
    """The cache of plain decoding: prefill of ids[:n_prompt], then one decode step per further token."""
    cache = model.model.new_cache(1, ids.shape[1] + 8)
    prefill(model, ids[:, :n_prompt], None, cache)
    for t in range(n_prompt, ids.shape[1]):
        decode_step(model, ids[:, t], cache)
    return cache


# ---- the cache on its own --------------------------------------------------------------------------------


@torch.no_grad()
def test_commit_equals_plain_decode(model):
    """One chunk of 6 tokens under speculation, committed to each n in 0..6, against decoding n tokens; and the
    draft's way (one-token steps under speculation) the same."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, 16), generator=g)
    base = model.model.new_cache(1, 32)
    prefill(model, ids[:, :10], None, base)
    worst = 0.0
    for n in range(7):
        expected = plain_cache(model, ids[:, : 10 + n], 10)
        chunk = base.select([0])
        chunk.begin_speculation()
        model(ids[:, 10:16], past_key_values=chunk, logits_to_keep=0)
        assert chunk.seq_len == 16
        chunk.commit(n)
        steps = base.select([0])
        steps.begin_speculation()
        for t in range(10, 16):
            decode_step(model, ids[:, t], steps)
        steps.commit(n)
        worst = max(worst, cache_diff(chunk, expected), cache_diff(steps, expected))
        assert not chunk.speculating and chunk.seq_len == 10 + n
    print("max cache difference", worst)
    assert worst < TOL


@torch.no_grad()
def test_speculation_leaves_committed_state_alone(model):
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = model.model.new_cache(1, 32)
    prefill(model, ids[:, :8], None, cache)
    before = [t.clone() for t in (cache.conv_states, cache.ssm_states, cache.positions)]
    cache.begin_speculation()
    model(ids[:, 8:], past_key_values=cache, logits_to_keep=0)
    for old, new in zip(before, (cache.conv_states, cache.ssm_states, cache.positions), strict=True):
        assert old is not new or torch.equal(old, new)
    assert torch.equal(before[0], cache.conv_states) and torch.equal(before[1], cache.ssm_states)
    # the verification's logits are those of a plain continuation
    expected = model(ids, use_cache=False).logits[:, 8:]
    cache.commit(0)
    again = model(ids[:, 8:], past_key_values=cache).logits
    print("logits diff", maxdiff(again, expected))
    torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-5)


def test_commit_errors():
    model = build()
    cache = model.model.new_cache(1, 16)
    with pytest.raises(RuntimeError, match="no speculation is open"):
        cache.commit(1)
    with torch.no_grad():
        prefill(model, torch.tensor([[3, 4, 5]]), None, cache)
        cache.begin_speculation()
        with pytest.raises(RuntimeError, match="already open"):
            cache.begin_speculation()
        model(torch.tensor([[6, 7]]), past_key_values=cache)
        with pytest.raises(RuntimeError, match="commit"):
            cache.select([0])
        with pytest.raises(ValueError, match=r"n must be in 0\.\.2"):
            cache.commit(3)
        cache.commit(2)
    assert cache.seq_len == 5 and not cache.speculating


# ---- greedy: exactly plain greedy ------------------------------------------------------------------------


@torch.no_grad()
def test_greedy_prompt_lookup_equals_plain(model):
    total = SpeculationStats()
    for seed, (n, period) in enumerate([(4, 6), (3, 5), (2, 9)]):
        ids = repetitive(n, period, seed=seed)
        plain = model.generate(ids, max_new_tokens=30, eos_token_id=[])
        for k, ngram in [(1, 1), (3, 2), (6, 3)]:
            stats = SpeculationStats()
            out = model.generate(ids, max_new_tokens=30, eos_token_id=[], prompt_lookup_num_tokens=k,
                                 max_matching_ngram_size=ngram, speculation_stats=stats)  # fmt: skip
            assert torch.equal(out, plain), (seed, k, ngram)
            for name in ("proposed", "accepted", "verifications"):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
    print(total, total.acceptance_rate)
    assert 0 < total.accepted < total.proposed  # drafts were partly accepted


@pytest.mark.parametrize("draft_kind", ["perturbed", "other config"])
@torch.no_grad()
def test_greedy_draft_model_equals_plain(model, draft_kind):
    if draft_kind == "perturbed":
        draft = perturbed(model, 0.1)
    else:
        draft = build(seed=5, layers_block_type=["mamba", "hybrid"], hidden_size=16, n_mamba_heads=2,
                      num_attention_heads=2, use_mem_rope=True)  # fmt: skip
    total = SpeculationStats()
    for seed in range(2):
        ids = repetitive(3, 5 + seed, seed=10 + seed)
        plain = model.generate(ids, max_new_tokens=24, eos_token_id=[])
        for k in (1, 3, 5):
            out = model.generate(ids, max_new_tokens=24, eos_token_id=[], assistant_model=draft,
                                 num_assistant_tokens=k, speculation_stats=total)  # fmt: skip
            assert torch.equal(out, plain), (seed, k)
    print(total, total.acceptance_rate)
    assert total.verifications > 0
    if draft_kind == "perturbed":
        assert 0 < total.accepted < total.proposed


@torch.no_grad()
def test_cache_equals_plain_after_every_verification(model):
    """Drive Speculator.step as the server does; after each step the model's cache (and the draft's) equals
    plain decoding of the same tokens, one decode step at a time."""
    worst = 0.0
    for proposer in (PromptLookup(2), DraftModel(perturbed(model, 0.1))):
        ids = repetitive(3, 6, seed=7)
        history = ids[0].tolist()
        cache = model.model.new_cache(1, 64)
        logits = prefill(model, ids, None, cache)
        history.append(int(logits.argmax(-1)))
        plain = model.model.new_cache(1, 64)
        prefill(model, ids, None, plain)
        plain_draft = None
        spec = Speculator(model, proposer, 4)
        while len(history) < ids.shape[1] + 24:
            step = spec.step(cache, history[-1], history, SamplingParams())
            history += step.tokens
            for t in history[plain.seq_len : -1]:  # plain decoding: all but the last token is fed
                decode_step(model, torch.tensor([t]), plain)
            worst = max(worst, cache_diff(cache, plain))
            if isinstance(proposer, DraftModel) and not proposer.cache.speculating:
                if plain_draft is None:
                    plain_draft = proposer.model.model.new_cache(1, 64)
                    prefill(proposer.model, ids, None, plain_draft)
                for t in proposer.ids[plain_draft.seq_len :].tolist():
                    decode_step(proposer.model, torch.tensor([t]), plain_draft)
                worst = max(worst, cache_diff(proposer.cache, plain_draft))
        assert spec.stats.verifications > 0 and spec.stats.accepted > 0
    print("max cache difference after a verification", worst)
    assert worst < TOL


@torch.no_grad()
def test_left_padded_batch_1_equals_plain():
    model = build(**CONFIGS["rope+adapters, 1 block"])
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), repetitive(3, 5)], dim=1)
    mask = torch.ones_like(ids)
    mask[:, :3] = 0
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], prompt_lookup_num_tokens=3)
    assert torch.equal(out, plain)


@torch.no_grad()
def test_eos_and_max_new_tokens_inside_an_accepted_run():
    """With the model itself as the draft every verification keeps all 5 drafts plus a bonus token: an
    end-of-sequence or the token limit falling inside such a run cuts it there, as plain decoding stops."""
    model = build(**CONFIGS["rope+adapters, 1 block"])
    ids = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    plain = model.generate(ids, max_new_tokens=30, eos_token_id=[])[0, ids.shape[1] :].tolist()
    # runs are new tokens 1-6, 7-12, ... (the first comes from the prompt): a token first seen mid-run
    firsts = [i for i, t in enumerate(plain) if t not in plain[:i] and i % 6 not in (0, 1)]
    assert firsts
    eos = plain[firsts[0]]
    for kw in (dict(assistant_model=perturbed(model, 0.0), num_assistant_tokens=5), dict(prompt_lookup_num_tokens=5)):
        stats = SpeculationStats()
        expected = model.generate(ids, max_new_tokens=30, eos_token_id=eos)
        got = model.generate(ids, max_new_tokens=30, eos_token_id=eos, speculation_stats=stats, **kw)
        assert torch.equal(got, expected) and got.shape[1] == ids.shape[1] + firsts[0] + 1
        for n in (1, 2, 5, 9, 16):
            expected = model.generate(ids, max_new_tokens=n, eos_token_id=[])
            got = model.generate(ids, max_new_tokens=n, eos_token_id=[], **kw)
            assert torch.equal(got, expected), n
        # min_new_tokens holds the end-of-sequence back at the right positions of a verification
        expected = model.generate(ids, max_new_tokens=30, eos_token_id=eos, min_new_tokens=firsts[0] + 2)
        got = model.generate(ids, max_new_tokens=30, eos_token_id=eos, min_new_tokens=firsts[0] + 2, **kw)
        assert torch.equal(got, expected)
        if "assistant_model" in kw:
            assert stats.accepted == stats.proposed > 0


@torch.no_grad()
def test_penalties_scores_stop_strings_streamer_match_plain():
    model = build(**CONFIGS["rope+adapters, 1 block"])
    ids = repetitive(4, 6, seed=3)
    kw = dict(max_new_tokens=24, eos_token_id=[], repetition_penalty=1.3, frequency_penalty=0.2,
              return_dict_in_generate=True, output_scores=True, output_logits=True)  # fmt: skip
    plain = model.generate(ids, **kw)
    got = model.generate(ids, prompt_lookup_num_tokens=4, **kw)
    assert torch.equal(got.sequences, plain.sequences)
    assert len(got.scores) == len(plain.scores) == len(got.logits) == 24  # one entry per emitted token
    worst = max(maxdiff(torch.cat(got.scores).clamp(min=-1e4), torch.cat(plain.scores).clamp(min=-1e4)),
                maxdiff(torch.cat(got.logits), torch.cat(plain.logits)))  # fmt: skip
    print("scores diff", worst)
    assert worst < 1e-4

    class Chars:  # a "tokenizer" spelling token i as chr(ord('a') + i % 26)
        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i % 26) for i in ids)

    class Collect:
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, t):
            self.tokens.append(t.clone())

        def end(self):
            self.ended = True

    new = model.generate(ids, max_new_tokens=24, eos_token_id=[])[0, ids.shape[1] :].tolist()
    stop = Chars().decode(new[10:12])
    expected = model.generate(ids, max_new_tokens=24, eos_token_id=[], stop_strings=stop, tokenizer=Chars())
    streamer = Collect()
    got = model.generate(ids, max_new_tokens=24, eos_token_id=[], stop_strings=stop, tokenizer=Chars(),
                         prompt_lookup_num_tokens=4, streamer=streamer)  # fmt: skip
    assert torch.equal(got, expected) and expected.shape[1] < ids.shape[1] + 24
    assert streamer.ended and torch.equal(torch.cat(streamer.tokens), got[0, ids.shape[1] :])


# ---- sampling: the distribution is the model's ----------------------------------------------------------


def test_rejection_rule_keeps_the_target_distribution():
    """`accept` on its own: the first token a verification emits is distributed as p at position 0, for a
    sampled draft (q) and a one-hot one (prompt lookup). 15,000 trials over 6 tokens: the total-variation
    distance of the empirical distribution to p must be below 0.03 (its sampling noise is ~0.008)."""
    g = torch.Generator().manual_seed(0)
    V, k, trials = 6, 3, 15_000
    params = SamplingParams(do_sample=True)
    scores = torch.randn(k + 1, V, generator=g) * 1.5
    p0 = torch.softmax(scores[0], -1)
    q = torch.softmax(torch.randn(k, V, generator=g) * 1.5, -1)
    for mode in ("draft", "lookup"):
        counts = torch.zeros(V)
        for _ in range(trials):
            if mode == "draft":
                drafts = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
                j, token = accept(scores, drafts, q, params, g)
            else:
                drafts = [1, 4, 2]
                j, token = accept(scores, drafts, None, params, g)
            counts[drafts[0] if j > 0 else token] += 1
        tv = 0.5 * (counts / trials - p0).abs().sum().item()
        print(mode, "TV", tv)
        assert tv < 0.03


def exact_joint(model, ids: torch.Tensor, n: int, params: SamplingParams) -> dict[tuple[int, ...], float]:
    """The exact distribution of the next n tokens under top-k sampling, from full forwards."""
    from zamba2.sampling import processed_logits

    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, prob in out.items():
            seq = torch.cat([ids, torch.tensor([prefix], dtype=torch.long)], dim=1) if prefix else ids
            p = torch.softmax(processed_logits(model(seq, use_cache=False).logits[:, -1], params), -1)[0]
            for t in p.nonzero().flatten().tolist():
                nxt[prefix + (t,)] = prob * float(p[t])
        out = nxt
    return out


@pytest.mark.parametrize(
    "proposer, runs",
    [("prompt lookup", 500), pytest.param("prompt lookup", 3000, marks=pytest.mark.slow),
     pytest.param("draft model", 1500, marks=pytest.mark.slow)],
)  # fmt: skip
@torch.no_grad()
def test_sampled_continuations_have_the_plain_distribution(proposer, runs):
    """3-token continuations sampled with top_k=3 (27 outcomes) over seeded runs against the exact
    distribution: chi-square with 26 degrees of freedom must stay below 54.1 (p = 0.001 under the right
    distribution), and the total-variation distance below twice its expected value under the right distribution,
    sum_x sqrt(p(x) (1 - p(x))) / sqrt(2 pi runs) (normal approximation of each count)."""
    model = build(layers_block_type=["mamba", "hybrid"], use_mem_rope=True)
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peakier distributions: the drafts get both accepted and rejected
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    params = SamplingParams(do_sample=True, top_k=3)
    exact = exact_joint(model, ids, 3, params)
    kw = dict(prompt_lookup_num_tokens=2) if proposer == "prompt lookup" else dict(
        assistant_model=perturbed(model, 0.3), num_assistant_tokens=2)  # fmt: skip
    stats = SpeculationStats()
    g = torch.Generator().manual_seed(123)
    counts: dict[tuple[int, ...], int] = {}
    for _ in range(runs):
        out = model.generate(ids, max_new_tokens=3, do_sample=True, top_k=3, eos_token_id=[], generator=g,
                             speculation_stats=stats, **kw)  # fmt: skip
        key = tuple(out[0, ids.shape[1] :].tolist())
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(exact)
    chi2 = sum((counts.get(key, 0) - runs * p) ** 2 / (runs * p) for key, p in exact.items())
    tv = 0.5 * sum(abs(counts.get(key, 0) / runs - p) for key, p in exact.items())
    expected_tv = sum(math.sqrt(p * (1 - p)) for p in exact.values()) / math.sqrt(2 * math.pi * runs)
    print(proposer, stats, f"chi2 {chi2:.1f} (26 dof) TV {tv:.4f} (expected {expected_tv:.4f})")
    assert 0 < stats.accepted < stats.proposed
    assert chi2 < 54.1 and tv < 2 * expected_tv
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-5)


# ---- the API ---------------------------------------------------------------------------------------------


def test_prompt_lookup_proposals():
    look = PromptLookup(2)
    h = torch.tensor([5, 6, 7, 8, 5, 6, 9, 5, 6])
    assert look.propose(h, 3, SamplingParams(), None) == ([9, 5, 6], None)  # the most recent "5 6"
    assert look.propose(h, 1, SamplingParams(), None)[0] == [9]
    assert look.propose(torch.tensor([1, 2, 3, 4]), 3, SamplingParams(), None)[0] == []
    assert look.propose(torch.tensor([4, 1, 2, 3, 4]), 3, SamplingParams(), None)[0] == [1, 2, 3]  # 1-gram
    assert look.propose(torch.tensor([7, 7, 7]), 4, SamplingParams(), None)[0] == [7]  # overlapping the suffix


def test_generation_config_fields():
    model = build()
    ids = repetitive(3, 5)
    plain = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    stats = SpeculationStats()
    cfg = GenerationConfig(prompt_lookup_num_tokens=3, max_matching_ngram_size=1)
    assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=[], generation_config=cfg,
                                      speculation_stats=stats), plain)  # fmt: skip
    assert stats.verifications > 0
    assert GenerationConfig.from_dict({"prompt_lookup_num_tokens": 4}).prompt_lookup_num_tokens == 4
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens must be >= 1"):
        GenerationConfig.from_dict({"prompt_lookup_num_tokens": 0})
    # num_assistant_tokens from a config (transformers keeps a default there) needs no assistant
    model.generate(ids, max_new_tokens=2, generation_config=GenerationConfig(num_assistant_tokens=20))
    model.generate(ids, max_new_tokens=2, num_assistant_tokens_schedule="heuristic")  # a speed knob: accepted


def test_errors():
    model = build()
    ids = repetitive(2, 5)
    cases = [
        (dict(prompt_lookup_num_tokens=2, assistant_model=model), "not both"),
        (dict(assistant_model=build(vocab_size=64)), r"vocab_size \(32\)"),
        (dict(assistant_model=object()), "assistant_model must be a Zamba2ForCausalLM"),
        (dict(prompt_lookup_num_tokens=0), "prompt_lookup_num_tokens must be an int >= 1"),
        (dict(prompt_lookup_num_tokens=True), "prompt_lookup_num_tokens must be an int >= 1"),
        (dict(assistant_model=model, num_assistant_tokens=0), "num_assistant_tokens must be an int >= 1"),
        (dict(num_assistant_tokens=3), "num_assistant_tokens needs assistant_model"),
        (dict(max_matching_ngram_size=2), "max_matching_ngram_size needs prompt_lookup_num_tokens"),
        (dict(prompt_lookup_num_tokens=2, max_matching_ngram_size=0), "max_matching_ngram_size must be an int"),
        (dict(speculation_stats=SpeculationStats()), "speculation_stats needs"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            model.generate(ids, max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match="speculative decoding supports batch size 1"):
        model.generate(ids.repeat(2, 1), max_new_tokens=4, prompt_lookup_num_tokens=2)
    with pytest.raises(ValueError, match="speculative decoding supports batch size 1"):
        list(model.generate_iter(ids.repeat(2, 1), max_new_tokens=4, assistant_model=model))
    with pytest.raises(TypeError, match="assistant_tokenizer"):
        model.generate(ids, max_new_tokens=4, assistant_tokenizer="x")
    spec = Speculator(model, PromptLookup(), 2)
    cache = model.model.new_cache(1, 16)
    with torch.no_grad():
        prefill(model, ids, None, cache)
    with pytest.raises(ValueError, match="history must end with last_token"):
        spec.step(cache, 3, [4, 5], SamplingParams())
    with pytest.raises(ValueError, match="int >= 1"):
        Speculator(model, PromptLookup(), 0)


def test_a_draft_that_costs_more_than_it_saves_backs_off():
    """The model as its own draft is always right, but each draft step costs a whole decode step: checks yield
    k + 1 tokens for 1.4 + k steps, so the speculator mostly decodes plainly; told the same draft is cheap, it
    keeps checking. The output is plain greedy's either way."""
    model = build()
    ids = repetitive(3, 5, seed=3)
    plain = model.generate(ids, max_new_tokens=40, eos_token_id=[])

    class Cheap(DraftModel):
        def cost(self, model) -> float:
            return 0.1

    for proposer, backs_off in ((DraftModel(model), True), (Cheap(model), False)):
        assert 0.9 < DraftModel(model).cost(model) < 1.1
        stats = SpeculationStats()
        speculator = Speculator(model, proposer, 4, stats)
        cache = model.model.new_cache(1, 64)
        logits = prefill(model, ids, None, cache)
        tokens = [int(logits.argmax(-1))]
        history = torch.cat([ids[0], torch.tensor(tokens)])
        while len(tokens) < 40:
            out = speculator.step(cache, tokens[-1], history, SamplingParams(), max_tokens=40 - len(tokens))
            tokens += out.tokens
            history = torch.cat([history, torch.tensor(out.tokens)])
        assert tokens == plain[0, ids.shape[1] :].tolist()
        assert stats.accepted == stats.proposed > 0
        assert (stats.plain_steps > 2 * stats.verifications) == backs_off, stats
