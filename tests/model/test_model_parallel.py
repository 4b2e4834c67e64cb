"""Expert parallelism: with 2 gloo processes, EP=2 gives the outputs and gradients of EP=1 (fp32),
with the expert weights sharded and with them kept whole (the mode pretraining uses in DeepSpeed)."""

import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import pytest

from model import Transformer, load_model_args
from model.parallel import apply_expert_parallel, expert_parameter_names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build():
    torch.manual_seed(0)
    m = Transformer(load_model_args("tiny", vocab=97, seq_aux_loss_alpha=0.0))
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.uniform_(-0.1, 0.1)
    return m


def data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, 97, (2, 11), generator=g), torch.randn(2, 11, 97, generator=g)


def leave_group() -> None:
    """The group's end, once the caller has dropped what holds it (the model's expert-parallel
    modules, the autograd graph): freed now, not during the interpreter's exit, where its worker
    thread would take the GIL mid-finalisation and abort the process (SIGABRT, now and then)."""
    dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def worker(rank, port, out_dir, shard):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = build()
    apply_expert_parallel(m, dist.group.WORLD, shard_weights=shard)
    tokens, g = data(rank)
    y = m(tokens)
    (y * g).sum().backward()
    torch.save({"y": y.detach(), "grads": {n: p.grad for n, p in m.named_parameters() if p.grad is not None}}, f"{out_dir}/rank{rank}.pt")
    del m, y, g, tokens
    leave_group()


@pytest.mark.parametrize("shard", [True, False], ids=["sharded", "whole"])
def test_expert_parallel_matches_single_process(tmp_path, shard):
    mp.spawn(worker, args=(free_port(), str(tmp_path), shard), nprocs=2, join=True)
    ref = build()
    ys = []
    for rank in range(2):
        tokens, g = data(rank)
        y = ref(tokens)
        (y * g).sum().backward()  # gradients accumulate over both ranks' data
        ys.append(y.detach())
    full = {n: p.grad for n, p in ref.named_parameters()}
    experts = set(expert_parameter_names(ref))
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["y"], ys[rank], atol=1e-5)
        for n, gr in got["grads"].items():
            if n in experts:  # this rank's slice of the experts, with both ranks' tokens
                n_local = full[n].shape[0] // 2
                mine = slice(rank * n_local, (rank + 1) * n_local)
                assert gr.shape[0] == (n_local if shard else full[n].shape[0]), n
                assert torch.allclose(gr if shard else gr[mine], full[n][mine], atol=1e-5), n
                if not shard:  # the other rank's experts get no gradient here
                    other = torch.ones(full[n].shape[0], dtype=torch.bool)
                    other[mine] = False
                    assert (gr[other] == 0).all(), n
    # replicated weights (and whole expert weights): the sum over ranks equals the single-process
    # gradient, so a data-parallel all-reduce gives the exact gradient
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt")["grads"] for r in range(2))
    for n in g0:
        if n not in experts or not shard:
            # summation order differs: compare at 1e-5 relative to the gradient's scale
            assert (g0[n] + g1[n] - full[n]).abs().max() <= 1e-5 * max(1.0, full[n].abs().max().item()), n


# --- expert-parallel sampling (issue 21): a 2-process sampler group decodes as one process ------

def gen_prompts(n):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 97, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


SAMPLINGS = {"sampled": dict(temperature=1.0, top_p=0.9), "greedy": dict(temperature=0.0, top_p=1.0)}


def sample_all(m, group=None):
    from model.generate import sample

    out = {}
    for n in (7, 1):  # 7 rows: 3 and 4 per member; 1 row: one member decodes a throw-away row
        for name, kw in SAMPLINGS.items():
            # stop tokens 5-14 end rows at different steps, so members finish at different times
            out[(n, name)] = sample(m, gen_prompts(n), max_new_tokens=12, stop_token_ids=list(range(5, 15)), seed=11, pad_id=0, group=group, **kw)
    return out


def sampler_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    m = build()
    apply_expert_parallel(m, dist.group.WORLD, shard_weights=True)
    assert m.layers[-1].ffn.experts.w1.shape[0] == m.args.n_routed_experts // 2
    torch.save(sample_all(m, dist.group.WORLD), f"{out_dir}/gen{rank}.pt")
    del m
    leave_group()


def test_a_two_process_sampler_group_generates_the_tokens_of_one_process(tmp_path):
    torch.set_num_threads(1)
    ref = sample_all(build())
    mp.spawn(sampler_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    varied = set()
    for rank in range(2):
        got = torch.load(tmp_path / f"gen{rank}.pt", weights_only=False)
        for key, want in ref.items():
            g = got[key]
            assert g.tokens == want.tokens, (rank, key)
            varied |= {len(t) for t in g.tokens}
            for a, b in zip(g.logprobs, want.logprobs):
                assert torch.allclose(a, b, atol=1e-5), (rank, key)
            for a, b in zip(g.experts, want.experts):
                assert torch.equal(a, b), (rank, key)
    assert len(varied) > 2  # rows stopped at different steps (the lockstep was exercised)


def test_sampled_rows_do_not_depend_on_their_batch():
    """Each row's draws are its own: sampled alone, or with compaction on or off, a row gets the same
    tokens as in the whole batch (what lets a sampler group split the rows)."""
    from model.generate import sample

    torch.set_num_threads(1)
    m, prompts = build(), gen_prompts(6)
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.95, stop_token_ids=[5], seed=3)
    whole = sample(m, prompts, **kw).tokens
    assert sample(m, prompts, compact_fraction=1.0, **kw).tokens == whole
    assert sample(m, prompts, compact_fraction=0.0, **kw).tokens == whole
    assert len({tuple(t) for t in whole}) == len(whole)  # not degenerate
