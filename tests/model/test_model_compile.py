"""Issue 24: the training forward and backward compile as one graph (`torch.compile(fullgraph=True)`):
no graph breaks, no host syncs in the MoE path, and the compiled loss, gradients and expert loads
equal the eager ones.

The equality check uses backend="aot_eager" (dynamo + AOTAutograd, the graphs the inductor backend
would compile, run by eager kernels): inductor's C++ compile of this model takes minutes on a shared
2-core CPU (6.5 min measured), which a test cannot afford; the graph-break check does not depend on
the backend. Run: `pytest tests/model/test_model_compile.py`.
"""

import torch
import torch._dynamo

from model import Transformer, load_model_args


def tiny():
    torch.manual_seed(0)
    m = Transformer(load_model_args("tiny", vocab=101))  # MTP depth 1, sequence aux loss on
    assert m.args.mtp_depth == 1 and m.args.seq_aux_loss_alpha > 0
    return m.train()


def batch():
    seq = torch.randint(0, 101, (2, 33), generator=torch.Generator().manual_seed(1))
    return seq[:, :-1], seq[:, 1:]


def test_training_loss_has_no_graph_breaks():
    m = tiny()
    tokens, targets = batch()
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda t, y: m.loss_terms(t, y)[0])(tokens, targets)
    assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
    assert ex.graph_count == 1


def test_compiled_loss_and_grads_equal_eager():
    m = tiny()
    tokens, targets = batch()

    def step(fn):
        m.zero_grad(set_to_none=True)
        for layer in m.moe_layers():
            layer.load.zero_()
        loss, terms = fn(tokens, targets)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return loss.detach(), {k: v.clone() for k, v in terms.items()}, grads, m.expert_loads().clone()

    loss_e, terms_e, grads_e, loads_e = step(m.loss_terms)
    torch._dynamo.reset()
    compiled = torch.compile(m.loss_terms, fullgraph=True, backend="aot_eager")
    loss_c, terms_c, grads_c, loads_c = step(compiled)

    assert set(terms_c) == {"ce_loss", "mtp_loss", "seq_aux_loss", "loss"} == set(terms_e)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for k in terms_e:
        torch.testing.assert_close(terms_c[k], terms_e[k], rtol=1e-6, atol=1e-6)
    # every parameter that learns in eager mode (routed experts, router, MTP block) learns the same
    assert set(grads_c) == set(grads_e) and any(".experts.w" in n for n in grads_e)
    for n, g in grads_e.items():
        torch.testing.assert_close(grads_c[n], g, rtol=1e-5, atol=1e-6, msg=n)
    # the balancing loads are counted on device inside the graph, as in eager mode
    assert torch.equal(loads_c, loads_e) and loads_e.sum() > 0
    # and the eager entry point still reports floats
    _, metrics = m.loss(tokens, targets)
    assert isinstance(metrics["loss"], float) and abs(metrics["loss"] - loss_e.item()) < 1e-5
