"""Generation with the MLA latent cache: greedy equals step-by-step argmax of the uncached forward,
rows are independent of padding, sampling is seeded, stop tokens end a row; cache size formula."""

import pytest
import torch

from model import ModelArgs, Transformer, load_model_args
from model.generate import generate, sample_next


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    args = load_model_args("tiny", vocab=97, init_std=0.08)
    return Transformer(args).eval()


def greedy_reference(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_cached_equals_uncached_argmax_batched_different_lengths(model):
    prompts = [[5, 6, 7, 8, 9], [11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11, 40, 41]]
    out = generate(model, prompts, max_new_tokens=16, temperature=0)
    for p, o in zip(prompts, out):
        assert o == greedy_reference(model, p, 16)


def test_row_output_does_not_depend_on_batch(model):
    alone = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=0.0)
    batched = generate(model, [[9] * 20, [1, 2, 3]], max_new_tokens=10, temperature=0.0)
    assert alone[0] == batched[1]


def test_seeded_sampling_reproducible_and_varied(model):
    prompts = [[1, 2, 3]] * 4
    a = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    b = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    c = generate(model, prompts, max_new_tokens=12, temperature=1.0, top_p=0.95, seed=8)
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # rows sample independently


def test_stop_tokens_end_rows(model):
    ref = greedy_reference(model, [5, 6, 7], 12)
    stop = ref[3]
    out = generate(model, [[5, 6, 7]], max_new_tokens=12, temperature=0, stop_token_ids=[stop])[0]
    assert out == ref[: ref.index(stop) + 1]


def test_rows_ending_at_different_steps_leave_the_others_unchanged(model):
    # Finished rows are dropped from the batch once they are compact_fraction of it (0: at once,
    # 1: never); every row must still get exactly its own greedy continuation, cut after its first
    # stop token.
    prompts = [[5, 6, 7], [11, 12], [3, 4, 5, 6, 7, 8], [40], [9, 9, 9, 9], [21, 22, 23], [60, 61], [70, 71, 72, 73, 74]]
    refs = [greedy_reference(model, p, 14) for p in prompts]
    stop = [refs[0][2], refs[2][5], refs[4][1]]  # rows 0, 2 and 4 stop early (others may too)
    for fraction in (0.0, 0.25, 1.0):
        out = generate(model, prompts, max_new_tokens=14, temperature=0, stop_token_ids=stop, compact_fraction=fraction)
        for ref, o in zip(refs, out):
            first = next((k for k, t in enumerate(ref) if t in stop), None)
            assert o == (ref if first is None else ref[: first + 1]), fraction
        assert sum(len(o) < 14 for o in out) >= 3
    with pytest.raises(ValueError, match="compact_fraction"):
        generate(model, prompts, max_new_tokens=4, compact_fraction=1.5)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, temperature=1.0, top_p=0.7, generator=g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2, 3 are never drawn


def test_too_long_and_bad_ids_are_clear_errors(model):
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 500], max_new_tokens=100, temperature=0)
    with pytest.raises(ValueError, match="ids outside"):
        model(torch.tensor([[1, 2, 500]]))


def test_latent_cache_size_671b():
    a = load_model_args("deepseek-v3-671b")
    mla = a.kv_lora_rank + a.qk_rope_head_dim  # values per token per layer
    mha = a.n_heads * (a.qk_head_dim + a.v_head_dim)  # keys and values of standard multi-head attention
    assert mla == 576
    saving = 1 - mla / mha
    assert saving > 0.9  # 98.6% vs MHA at the same head dims
    # caches really hold only that many values
    m = Transformer(ModelArgs())
    c = m.new_caches(batch=1, max_len=1)[0]
    assert c.kv_BSC.numel() + c.pe_BSR.numel() == ModelArgs().kv_lora_rank + ModelArgs().qk_rope_head_dim


# --- behaviour log-probs and routed experts (issue 20) -----------------------------------------


def test_sample_logprobs_are_those_of_the_sampling_distribution(model):
    """Each token's log-prob is log(softmax(logits / T)[tok] / nucleus mass), the logits from the
    uncached forward of the sequence so far; the tokens are generate()'s."""
    from model.generate import generate as gen_tokens, sample

    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16]]
    T, top_p = 0.7, 0.9
    got = sample(model, prompts, max_new_tokens=8, temperature=T, top_p=top_p, seed=3)
    assert got.tokens == gen_tokens(model, prompts, max_new_tokens=8, temperature=T, top_p=top_p, seed=3)
    for p, toks, lp in zip(prompts, got.tokens, got.logprobs):
        seq = torch.tensor([p + toks])
        with torch.no_grad():
            logits = model(seq)[0, len(p) - 1 : len(p) - 1 + len(toks)].double()
        probs = torch.softmax(logits / T, dim=-1)
        sorted_p = probs.sort(dim=-1, descending=True).values
        nucleus = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0).sum(-1)
        want = (probs.gather(1, torch.tensor(toks).unsqueeze(1)).squeeze(1) / nucleus).log()
        torch.testing.assert_close(lp.double(), want, rtol=0, atol=2e-5)


def test_sample_records_the_experts_of_every_input_position(model):
    """Experts per main-model MoE layer and input position (prompt + completion - 1), as the
    uncached forward of the whole sequence routes them; uint8 for 8 experts."""
    from model.generate import sample

    prompts = [[5, 6, 7], [11, 12, 13, 14, 15, 16]]
    got = sample(model, prompts, max_new_tokens=6, temperature=1.0, seed=0)
    L, K = model.args.n_moe_layers, model.args.n_activated_experts
    for p, toks, ex in zip(prompts, got.tokens, got.experts):
        assert ex.dtype == torch.uint8 and ex.shape == (L, len(p) + len(toks) - 1, K)
        with torch.no_grad():
            model(torch.tensor([p + toks[:-1]]))
        ref = model.routed_experts()  # [L, positions, K]
        assert torch.equal(ex.long().sort(-1).values, ref.sort(-1).values)


# --- static decoding: fixed shapes, one CUDA graph per step on GPU (issue 24) -------------------


def test_static_path_equals_dynamic_with_early_stops_and_bucket_step_down(model):
    """Same tokens and routed experts as the default path, log-probs to rounding: greedy and
    sampled, prompts of 1-11 tokens, rows stopping at different steps; the batch starts padded
    (12 rows in a 16-row bucket), steps down buckets as rows finish, and the attended cache grows
    in blocks. One decoder serves both calls (its buffers keep the first call's values)."""
    from model.generate import sample
    from model.static_decode import StaticDecoder

    prompts = [list(range(3, 3 + n)) for n in (5, 2, 11, 1, 4, 3, 7, 2, 9, 6, 1, 8)]
    stops = list(range(30, 40))  # ~10% of the vocabulary: rows stop at spread lengths
    dec = StaticDecoder(model, rows=16, max_len=11 + 24, check_every=2, slot_block=8)
    for temperature, top_p in ((0.0, 1.0), (0.8, 0.9)):
        kw = dict(max_new_tokens=24, temperature=temperature, top_p=top_p, stop_token_ids=stops, seed=5)
        want = sample(model, prompts, **kw)
        got = sample(model, prompts, decoder=dec, **kw)
        assert got.tokens == want.tokens, temperature
        for g, w in zip(got.logprobs, want.logprobs):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        assert all(torch.equal(g, w) for g, w in zip(got.experts, want.experts))
        lengths = [len(t) for t in want.tokens]
        assert min(lengths) <= 3 and max(lengths) >= 20, lengths  # some stop early, some much later
        rows = [r for r, _ in dec.shapes]
        assert rows[0] == 16 and len(set(rows)) >= 3 and rows == sorted(rows, reverse=True), dec.shapes
        assert len({s for _, s in dec.shapes}) >= 3, dec.shapes


def test_static_generate_one_off_decoder_and_clear_refusals(model):
    from model.generate import generate, sample
    from model.static_decode import StaticDecoder

    prompts = [[5, 6, 7], [11, 12], [40, 41, 42, 43]]
    want = generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=2)
    assert generate(model, prompts, max_new_tokens=10, temperature=1.0, seed=2, static=True) == want
    small = StaticDecoder(model, rows=2, max_len=16)
    with pytest.raises(ValueError, match="holds 2 rows of 16 slots"):
        sample(model, prompts, max_new_tokens=10, decoder=small)
    model.set_exact(True)
    try:
        with pytest.raises(ValueError, match="exact mode"):
            sample(model, prompts, max_new_tokens=4, static=True)
    finally:
        model.set_exact(False)


def test_static_step_is_one_graph_with_fixed_shapes(model):
    """What CUDA graph capture needs, checked on CPU: the step compiles as one graph with no graph
    break (a host read such as .item(), int() or .tolist() would break it) and never recompiles
    while decoding (a shape or a Python value that changes per token would). The compiled step's
    tokens are the default path's."""
    import torch._dynamo

    from model.generate import sample
    from model.static_decode import StaticDecoder

    prompts = [[5, 6, 7], [11, 12], [40, 41, 42, 43], [9]]
    kw = dict(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=1)
    dec = StaticDecoder(model, rows=4, max_len=16, slot_block=64)  # one row bucket, one slot block
    torch._dynamo.reset()
    dec.step = torch.compile(dec.step, fullgraph=True, backend="eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = sample(model, prompts, decoder=dec, **kw)
    assert dec.shapes == [(4, 16)]
    assert got.tokens == sample(model, prompts, **kw).tokens
    # torch 2.13's fullgraph compile traces .item() / int() as a graph value instead of failing;
    # explain still reports them as graph breaks (the step is run once more: slot 15 is free)
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(StaticDecoder.step)(dec, dec._bucket(4, 16))
    assert ex.graph_break_count == 0 and ex.graph_count == 1, [str(r.reason) for r in ex.break_reasons]
    torch._dynamo.reset()


@pytest.mark.gpu
def test_gpu_static_cuda_graphs_equal_dynamic(model):
    """On CUDA: each step shape is captured once (a host sync inside the step would fail the
    capture), a second call only replays, and the tokens are the dynamic path's (fp32)."""
    from model.generate import sample
    from model.static_decode import StaticDecoder

    gpu = Transformer(model.args).cuda().eval()
    gpu.load_state_dict(model.state_dict())
    prompts = [list(range(3, 3 + n)) for n in (5, 2, 11, 1, 4, 3, 7, 2, 9, 6, 1, 8)]
    kw = dict(max_new_tokens=24, temperature=0.8, top_p=0.9, stop_token_ids=list(range(30, 40)), seed=5)
    dec = StaticDecoder(gpu, rows=16, max_len=35, check_every=2, slot_block=8)
    assert dec.cuda_graph
    want = sample(gpu, prompts, **kw)
    got = sample(gpu, prompts, decoder=dec, **kw)
    captured = len(dec._graphs)
    assert captured == len(dec.shapes) >= 3, dec.shapes
    again = sample(gpu, prompts, decoder=dec, **kw)
    assert len(dec._graphs) == captured  # replayed, not captured again
    assert got.tokens == again.tokens == want.tokens
    for g, w in zip(got.logprobs, want.logprobs):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-4)
    assert all(torch.equal(g, w) for g, w in zip(got.experts, want.experts))
