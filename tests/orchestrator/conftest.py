"""Fixtures shared by the orchestrator tests."""

import pytest
import torch


@pytest.fixture(scope="session")
def policy_dir(tmp_path_factory):
    """(directory, tokenizer): an HF directory `hf/` of a tiny random policy and the tokenizer.json it uses."""
    from data.config import DataConfig
    from data.prepare import math_documents
    from data.tokenizer import train_tokenizer
    from model import Transformer
    from model.args import load_model_args
    from model.hf import save_hf_pretrained

    root = tmp_path_factory.mktemp("policy")
    tok = train_tokenizer(math_documents(DataConfig(math_docs=500)), 512, root / "tokenizer.json")
    torch.manual_seed(0)
    save_hf_pretrained(Transformer(load_model_args("tiny")), root / "hf")
    return root, tok


@pytest.fixture(scope="session")
def straight_run(policy_dir, tmp_path_factory):
    """Four GRPO steps on Ray actors, uninterrupted (`sputnik grpo`, test_orch_grpo.grpo_args): the
    reference of the resume test and of the one-process runtime's."""
    from tests.orchestrator.test_orch_grpo import grpo_args, sputnik

    out = tmp_path_factory.mktemp("grpo") / "straight"
    sputnik(*grpo_args(policy_dir), "--out", str(out))
    return out
