"""SFT data (data/sft.py): table reading with row-level errors, the loss on completion tokens only,
packing without cross-document attention, and a loader that resumes exactly.

References: the same examples run one at a time through the model (no packing, no mask), and a
hand-written loss over the completion tokens."""

import json

import pytest
import torch
import torch.nn.functional as F

from data.sft import IGNORE, SFTDataError, SFTLoader, build_row, doc_mask, encode_examples, pack_rows, read_sft_table


def small_model(mtp: int = 1):
    # imported here, not at collection: importing the model imports the kernels, which must see
    # tests/kernels/conftest.py's TRITON_INTERPRET first when the whole suite runs
    from model import ModelArgs, Transformer

    torch.manual_seed(0)
    args = ModelArgs(vocab=97, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                     q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                     n_routed_experts=8, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                     route_scale=2.5, max_seq_len=64, mtp_depth=mtp, init_std=0.2)
    return Transformer(args).eval()


def examples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, plen in ((9, 4), (6, 3), (12, 7), (5, 2)):
        out.append((torch.randint(1, 97, (n,), generator=g).tolist(), plen))
    return out


def test_build_row_masks_prompt_tokens_by_hand():
    ex = [([5, 6, 7, 8, 9], 3), ([10, 11, 12], 1)]
    row = build_row(ex, [0, 1], seq_len=8, pad_id=0)
    # example 0: inputs 5 6 7 8, targets 6 7 8 9, of which 6 and 7 are prompt tokens (prompt 5 6 7)
    # example 1: inputs 10 11, targets 11 12 (prompt is only 10); then two pad positions
    assert row["tokens"].tolist() == [5, 6, 7, 8, 10, 11, 0, 0]
    assert row["targets"].tolist() == [IGNORE, IGNORE, 8, 9, 11, 12, IGNORE, IGNORE]
    assert row["positions"].tolist() == [0, 1, 2, 3, 0, 1, 0, 0]
    assert row["doc"].tolist() == [0, 0, 0, 0, 1, 1, -1, -1]
    m = doc_mask(row["doc"][None])[0]
    assert m[5].tolist() == [False] * 4 + [True, True, False, False]  # example 1 never sees example 0
    assert m[3].tolist() == [True] * 4 + [False] * 4
    assert m[7].tolist() == [False] * 7 + [True]  # padding sees itself only


@pytest.mark.parametrize("mtp", [0, 1])
def test_packed_loss_equals_each_example_alone_on_completion_tokens(mtp):
    model = small_model(mtp)
    ex = examples()
    rows = pack_rows(ex, list(range(len(ex))), seq_len=24)
    assert len(rows) == 2 and sorted(i for r in rows for i in r) == [0, 1, 2, 3]
    built = [build_row(ex, r, 24, 0) for r in rows]
    b = {k: torch.stack([x[k] for x in built]) for k in built[0]}
    loss, _ = model.loss(b["tokens"], b["targets"], positions_BT=b["positions"], mask_BTS=doc_mask(b["doc"]))
    # reference: each example alone, the loss summed over its completion targets, averaged over all
    total, count = 0.0, 0
    model.requires_grad_(False)
    for ids, plen in ex:
        t = torch.tensor(ids)
        logits = model(t[None, :-1])[0]
        ce = F.cross_entropy(logits, t[1:], reduction="none")
        total += float(ce[plen - 1 :].sum())
        count += len(ids) - plen
    assert float(loss) == pytest.approx(total / count, rel=1e-5, abs=1e-6)


def test_packed_logits_equal_each_example_alone():
    model = small_model()
    ex = examples()
    row = build_row(ex, [2, 0, 3], seq_len=30, pad_id=0)
    with torch.no_grad():
        packed = model(row["tokens"][None], positions_BT=row["positions"][None], mask_BTS=doc_mask(row["doc"][None]))[0]
        at = 0
        for i in (2, 0, 3):
            ids = torch.tensor(ex[i][0])
            alone = model(ids[None, :-1])[0]
            torch.testing.assert_close(packed[at : at + len(ids) - 1], alone, rtol=1e-4, atol=1e-5)
            at += len(ids) - 1


def test_loader_resumes_exactly_and_ranks_split_the_global_batch():
    ex = [(list(range(1, 3 + (i % 11))), 2) for i in range(200)]
    a = SFTLoader(ex, seq_len=16, batch_size=4, pad_id=0, seed=3)
    for _ in range(a.batches_per_epoch + 2):  # into the second epoch
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(3)]
    b = SFTLoader(ex, seq_len=16, batch_size=4, pad_id=0, seed=3)
    b.load_state_dict(state)
    for e in expected:
        got = next(b)
        assert all(torch.equal(got[k], e[k]) for k in e)
    whole = next(SFTLoader(ex, seq_len=16, batch_size=4, pad_id=0, seed=5))
    parts = [next(SFTLoader(ex, seq_len=16, batch_size=4, pad_id=0, seed=5, rank=r, world_size=2)) for r in range(2)]
    assert torch.equal(torch.cat([p["tokens"] for p in parts]), whole["tokens"])
    # every example of an epoch is packed exactly once
    rows = a._layout(0)
    assert sorted(i for r in rows for i in r) == list(range(200))


def test_table_rows_and_errors_name_the_row(tmp_path):
    good = tmp_path / "t.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What is 2 + 3?", "completion": "5</think> <answer>5</answer>", "split": "heldout"},
        {"messages": [{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}], "id": "chat-1"},
    ]) + "\n")
    rows = read_sft_table(good)
    assert rows[0]["split"] == "heldout" and rows[1]["prompt"] == "What is 1 + 1?" and rows[1]["completion"] == "2"
    assert rows[1]["id"] == "chat-1"
    cases = {
        '{"prompt": "x"}': "row 1 needs a non-empty string 'completion'",
        '{"prompt": "x", "completion": "y", "split": "test"}': "row 1: split 'test'",
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}': "row 1: 'messages' must end",
        "not json": "row 1 is not valid JSON",
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"prompt": "ok", "completion": "ok"}) + "\n" + line + "\n")
        with pytest.raises(SFTDataError, match="bad.jsonl: " + msg.replace("(", r"\(").replace("[", r"\[")):
            read_sft_table(bad)


def test_examples_continue_the_prompt_grpo_samples_from(tmp_path):
    from data.config import DataConfig
    from data.prepare import math_documents
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(math_documents(DataConfig(math_docs=200)), 320, tmp_path / "tokenizer.json")
    rows = [{"id": "a", "prompt": "What is 12 + 30?", "completion": "12 + 30 = 42</think> <answer>42</answer>", "split": "train"}]
    (ids, plen), = encode_examples(rows, tok, "r1")
    assert ids[:plen] == tok.prompt_ids("What is 12 + 30?", "r1")  # what the rollout samplers are given
    assert ids[plen:] == tok.encode(rows[0]["completion"]) + [tok.eos_id]
