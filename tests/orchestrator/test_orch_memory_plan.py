"""The memory plan (orchestrator/memory_plan.py) against measurement, and the 671B arithmetic.

Measured: real pretraining steps (the DeepSpeed engine, owned experts and train_step of
orchestrator/pretrain_worker.py; gloo, DS_ACCELERATOR=cpu, fp32) for the tiny preset on 1, 2 and 4
ranks (ZeRO 1, 2 and 3, owned expert parallel 2 — on 4 ranks with each expert's state split over 2 —,
activation checkpointing on 1 rank) and the small preset on 1 rank; the peak of each
rank must be within 15% of the plan's peak for that rank.

How the peak is measured: RSS would include ~400 MB of libraries and the allocator's slack, so we
count tensor bytes instead. torch.profiler with profile_memory=True records every CPU allocation
and free of torch's allocator as a "[memory]" event with its signed size and time; their running
sum, from before the model is built through two optimizer steps, is the bytes of tensors alive at
each moment, temporaries inside ops included, and its maximum is the peak. Tensors made before the
profile (none that the run keeps) would only lower the sum. Two steps, because AdamW's moments
appear in the first step and the second runs with them.
"""


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import load_model_args
from orchestrator.config import PretrainConfig
from orchestrator.dist_local import free_port, join_local_group
from orchestrator.memory_plan import GIB, activation_bytes, count_parameters, pretrain_rank, zero_states

TOLERANCE = 0.15
# (preset, micro-batch, seq, ZeRO stage, expert parallel, activation checkpointing) per world size
ONE_RANK = [("tiny", 8, 128, 2, 1, False), ("tiny", 8, 128, 2, 1, True), ("small", 1, 64, 2, 1, False)]
TWO_RANKS = [("tiny", 8, 128, 1, 1, False), ("tiny", 8, 128, 3, 1, False), ("tiny", 8, 128, 2, 2, False)]
FOUR_RANKS = [("tiny", 4, 128, 2, 2, False)]  # owned experts' state split over the 2 ranks that own them


def peak_bytes(prof) -> int:
    """The largest running sum of the profile's allocation events (bytes alive at once)."""
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def measure(rank: int, world: int, preset: str, batch: int, seq: int, stage: int, ep: int, ac: bool) -> int:
    from torch.profiler import ProfilerActivity, profile

    from model import Transformer
    from model.parallel import apply_activation_checkpointing
    from orchestrator.pretrain_worker import build_engine, own_experts, train_step

    args = load_model_args(preset)
    p = PretrainConfig(micro_batch_size=batch, zero_stage=stage, expert_parallel=ep, steps=10, warmup_steps=1, activation_checkpointing=ac)

    class Rows:  # this rank's rows of a global batch
        step = 0

        def __next__(self):
            self.step += 1
            g = torch.Generator().manual_seed(self.step)
            tokens = torch.randint(0, args.vocab, (batch * world, seq + 1), generator=g)[rank * batch:(rank + 1) * batch]
            return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:]}

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = Transformer(args)
        if ac:
            apply_activation_checkpointing(model)
        experts = own_experts(model, p, rank, world, bf16=False)
        engine, _ = build_engine(model, p, world, bf16=False)
        if experts is not None:
            experts.hook_global_norm(engine)
        rows = Rows()
        for _ in range(2):
            train_step(engine, model, rows, 1, torch.device("cpu"), world, experts=experts)
    del engine, model, experts
    return peak_bytes(prof)


def worker(rank, world, port, configs, out):
    join_local_group(rank, world, port)
    peaks = torch.tensor([float(measure(rank, world, *c)) for c in configs], dtype=torch.float64)
    every = [torch.zeros_like(peaks) for _ in range(world)]
    dist.all_gather(every, peaks)
    if rank == 0:
        torch.save(torch.stack(every), out)
    dist.barrier()
    dist.destroy_process_group()


def planned(world: int, preset: str, batch: int, seq: int, stage: int, ep: int, ac: bool) -> float:
    args = load_model_args(preset)
    p = PretrainConfig(micro_batch_size=batch, zero_stage=stage, expert_parallel=ep, activation_checkpointing=ac)
    return pretrain_rank(args, count_parameters(args), p, world=world, seq=seq, gpu=False).peak


@pytest.mark.parametrize("world,configs", [(1, ONE_RANK), (2, TWO_RANKS), (4, FOUR_RANKS)], ids=["1-rank", "2-ranks", "4-ranks"])
def test_measured_peak_per_rank_is_within_15_percent_of_the_plan(tmp_path, world, configs):
    out = tmp_path / "peaks.pt"
    mp.spawn(worker, args=(world, free_port(), configs, str(out)), nprocs=world, join=True)
    measured = torch.load(out)  # [rank, config]
    lines, bad = [], []
    for j, c in enumerate(configs):
        plan = planned(world, *c)
        for rank in range(world):
            ratio = float(measured[rank, j]) / plan
            lines.append(f"{c} rank {rank}: measured {measured[rank, j] / 2**20:.1f} MiB, plan {plan / 2**20:.1f} MiB, ratio {ratio:.3f}")
            if abs(ratio - 1) > TOLERANCE:
                bad.append(lines[-1])
    print("\n".join(lines))
    assert not bad, "\n".join(bad)


def test_671b_parameters_are_the_papers():
    """DeepSeek-V3: 671B parameters, 37B activated per token; the MTP module adds 14B in the paper's
    count (its own 11.6B, plus the embedding and output head it shares, which we count once)."""
    args = load_model_args("deepseek-v3-671b")
    pc = count_parameters(args)
    D, I, E, H = 7168, 2048, 256, 128
    per_moe_layer = E * 3 * D * I  # 11.27B routed per MoE layer
    assert pc.routed - pc.routed_mtp == 58 * per_moe_layer and pc.routed_mtp == per_moe_layer
    assert 670.5e9 < pc.main < 671.5e9 and 37.0e9 < pc.activated < 38.0e9
    assert pc.embed == pc.head == 129280 * D
    assert 13e9 < pc.mtp + pc.embed + pc.head < 14.5e9  # the paper's "14B"
    mla = D * 1536 + 1536 + 1536 * H * 192 + D * 576 + 512 + 512 * H * 256 + H * 128 * D
    assert pc.total - pc.routed == 2 * 129280 * D + 62 * (mla + 2 * D) + 3 * 3 * D * 18432 + 59 * (3 * D * I + E * D) + D \
        + (2 * D * D + 3 * D)  # embed+head, 62 blocks' MLA and norms, 3 dense FFNs, 59 shared experts + gates, final norm, MTP's extras


def test_zero_arithmetic_by_hand():
    """bf16 on 256 GPUs: ZeRO-2 keeps 2 bytes per parameter whole and 12 sharded; ZeRO-3 all 14 (+2 at the step) sharded."""
    n, dp = 20_000_000_000, 256
    z2 = zero_states(n, (10**9,), stage=2, dp=dp, w=2, offload=False)
    assert z2["parameters"] == 2 * n + 4 * n / dp and z2["optimizer"] == 8 * n / dp and z2["bucket"] == 2 * 5e8
    z3 = zero_states(n, (10**9,), stage=3, dp=dp, w=2, offload=False)
    assert z3["parameters"] == 2 * n / dp + 4 * n / dp and z3["buffers"] == 2 * 5e8 + 2 * (5e7 + 10**9)
    off = zero_states(n, (10**9,), stage=2, dp=dp, w=2, offload=True)
    # offloaded: fp32 masters, moments and gradients in host memory (DeepSpeed's CPU Adam, no temporary)
    assert off["optimizer"] == 0 and off["host"] == 4 * n / dp + 8 * n / dp + 4 * n / dp


def test_activation_checkpointing_keeps_block_inputs_and_one_block():
    args = load_model_args("small")
    full = activation_bytes(args, 4, 512, w=2, gpu=True, checkpointing=False)
    ckpt = activation_bytes(args, 4, 512, w=2, gpu=True, checkpointing=True)
    assert ckpt < full / 2
    # the 671B preset: one 4096-token sequence per GPU is ~60 GiB of saved activations without checkpointing
    big = load_model_args("deepseek-v3-671b")
    assert activation_bytes(big, 1, 4096, w=2, gpu=True, checkpointing=False) / GIB > 40


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_a_sampler_groups_weights_and_cache_are_the_plans(tmp_path, ep):
    """rollout.expert_parallel K: the weights a member loads (from_hf_pretrained(experts=(0, K)) in
    rollout.dtype, what RolloutSampler holds) are exactly the plan's parameters, and its latent cache
    for its share of a call's rows is the plan's (Transformer.new_caches), for each rollout.dtype on
    a GPU and on CPU (auto: bf16 on a GPU)."""
    from model import Transformer
    from model.hf import from_hf_pretrained, save_hf_pretrained
    from orchestrator.config import load_config
    from orchestrator.memory_plan import sampler_calls, sampler_rank

    args = load_model_args("tiny")
    torch.manual_seed(0)
    save_hf_pretrained(Transformer(args), tmp_path / "hf")
    for name, gpu, dtype in [("auto", False, torch.float32), ("auto", True, torch.bfloat16),
                             ("bfloat16", False, torch.bfloat16), ("float32", True, torch.float32)]:
        member = from_hf_pretrained(tmp_path / "hf", experts=(0, ep) if ep > 1 else None, dtype=dtype)
        held = sum(p.numel() * p.element_size() for p in member.parameters())
        cfg = load_config(None, [f"rollout.num_samplers={2 * ep}", f"rollout.expert_parallel={ep}", "rollout.max_new_tokens=64",
                                 f"rollout.dtype={name}"])
        plan = sampler_rank(args, count_parameters(args), cfg.grpo, cfg.rollout, prompt_len=32, gpu=gpu)
        assert plan.parameters == held, name
        rows = -(-sampler_calls(cfg.grpo, cfg.rollout) // ep)
        cache = sum(c.buf_BSL.numel() * c.buf_BSL.element_size() for c in member.new_caches(rows, 32 + 64))
        ids = (args.n_layers - args.n_dense_layers) * rows * (32 + 64) * args.n_activated_experts  # the uint8 routed-expert record
        assert plan.kv_cache == cache + ids, name


def test_a_larger_sampler_group_is_advised_and_says_when_it_spans_nodes():
    """The plan advises doubling a sampler group first; where the doubled group is larger than a
    node's GPUs it says the group spans nodes (placement.py), and it asks for the samplers it needs."""
    from orchestrator.config import load_config
    from orchestrator.memory_plan import sampler_rank

    cfg = load_config(None, ["model.preset=deepseek-v3-671b", "rollout.num_samplers=8", "rollout.expert_parallel=4"])
    pc = count_parameters(cfg.model)

    def advice(max_group):
        return sampler_rank(cfg.model, pc, cfg.grpo, cfg.rollout, prompt_len=256, gpu=True, max_group=max_group).advice

    assert advice(8)[0] == "a larger sampler expert-parallel group (rollout.expert_parallel=8, rollout.num_samplers a multiple)"
    assert advice(4)[0] == "a larger sampler expert-parallel group (rollout.expert_parallel=8, spanning 2 nodes, rollout.num_samplers a multiple)"
    assert advice(2)[0].startswith("a larger sampler expert-parallel group (rollout.expert_parallel=8, spanning 4 nodes")
    cfg.rollout.num_samplers = 4
    assert advice(8)[0].endswith("rollout.num_samplers a multiple >= 8)") and advice(4)[1:] == advice(8)[1:]

def test_a_sampler_whose_weights_alone_do_not_fit_is_told_only_what_shrinks_them():
    """When a sampler's weights exceed its GPU, fewer completions or shorter ones cannot help: the
    one-line verdict names the weights ((non-expert + routed / K) x bytes per parameter) and advises
    bf16 weights (fp32 asked for) and a larger group only."""
    from orchestrator.config import load_config
    from orchestrator.memory_plan import GIB, misfit, sampler_rank

    for dtype, elt in (("float32", 4), ("auto", 2)):
        cfg = load_config(None, ["model.preset=deepseek-v3-671b", "rollout.num_samplers=16", "rollout.expert_parallel=8",
                                 f"rollout.dtype={dtype}"])
        pc = count_parameters(cfg.model)
        mem = sampler_rank(cfg.model, pc, cfg.grpo, cfg.rollout, prompt_len=256, gpu=True, max_group=8)
        mem.capacity = 131 * GIB
        weights = (pc.total - pc.routed + pc.routed // 8) * elt + pc.buffer_bytes
        line = misfit([mem])
        assert f"(its weights alone {weights / GIB:.1f} GiB)" in line and "completions" not in line, line
        assert ("bf16 weights (rollout.dtype=auto); " in line) == (dtype == "float32"), line
        assert line.endswith("a larger sampler expert-parallel group (rollout.expert_parallel=16, spanning 2 nodes, "
                             "rollout.num_samplers a multiple)"), line
        mem.capacity = weights + 1  # the weights fit, the cache does not: the other advice comes back
        assert "fewer completions per call" in misfit([mem])
