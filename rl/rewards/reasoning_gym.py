"""reasoning-gym tasks scored by reasoning-gym's own scorer.

A reasoning-gym task row (data.tasks.generate_reasoning_gym) names its entry in `tests`:

    {"verifier": "reasoning_gym", "dataset": "countdown", "config": {"size": 500, "seed": 0, ...}, "index": 7}

plus the entry's "metadata" when JSON holds it faithfully. The entry the scorer sees is the row's
question and answer with that metadata, or else it is regenerated (reasoning-gym datasets build
entry i from seed + i, so this is exact and cheap) and checked against the row's prompt. Then the
dataset's `score_answer(answer, entry)` judges the completion's answer: the last
<answer>...</answer>, else the last \\boxed{}. (Generators without a single reference answer,
such as graph_color or rush_hour, have answer "" and a scorer that checks the proposed solution.)
Wrapped against gaming and failure (reward hacking is adversarial territory):

* only a full score counts (1.0, else 0.0): the default scorer gives partial credit to any answer
  that *contains* the reference, so listing candidates ("3 4 5 6 7") would earn reward;
* a completion with several different <answer> blocks, or an answer that contains the whole
  question (an echo), scores 0;
* a scorer that raises, or an entry that cannot be rebuilt, scores 0 (logged once per kind of error).

Test: `pytest tests/rl/test_reasoning_gym_reward.py`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from typing import Mapping

from rl.rewards.math import MAX_ANSWER_CHARS, extract_answer

log = logging.getLogger(__name__)

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def parse_spec(tests: str) -> dict | None:
    """The reasoning-gym spec in a `tests` string, or None."""
    if not tests or not tests.lstrip().startswith("{"):
        return None
    try:
        spec = json.loads(tests)
    except ValueError:
        return None
    return spec if isinstance(spec, dict) and spec.get("verifier") == "reasoning_gym" else None


def spec_problem(spec: dict) -> str | None:
    """Why a reasoning-gym spec cannot be used (None when it can)."""
    if not isinstance(spec.get("dataset"), str) or not isinstance(spec.get("config"), dict):
        return "its reasoning-gym spec lacks \"dataset\" (a name) or \"config\" (an object)"
    if isinstance(spec.get("index"), bool) or not isinstance(spec.get("index"), int) or spec["index"] < 0:
        return "its reasoning-gym spec lacks \"index\" (an entry number >= 0)"
    return None


@functools.lru_cache(maxsize=64)
def _dataset(name: str, config_json: str):
    import reasoning_gym

    return reasoning_gym.create_dataset(name, **json.loads(config_json))


def entry_of(spec: dict) -> dict:
    """The reasoning-gym entry a spec names (raises when it cannot be built)."""
    return _dataset(spec["dataset"], json.dumps(spec["config"], sort_keys=True))[spec["index"]]


@functools.lru_cache(maxsize=256)
def _warn_once(dataset: str, error: str) -> None:
    log.warning("reasoning-gym %s: scoring failed (%s); such completions score 0", dataset, error)


def reasoning_gym_reward(completion: str, sample: Mapping, spec: dict | None = None) -> float:
    """1.0 when reasoning-gym's scorer gives the completion's answer full marks, else 0.0."""
    spec = spec or parse_spec(str(sample.get("tests") or ""))
    if spec is None or spec_problem(spec):
        return 0.0
    if len({a.strip() for a in _ANSWER.findall(completion)}) > 1:  # several different answers: none is "the" answer
        return 0.0
    answer = extract_answer(completion)
    prompt = str(sample.get("prompt") or "").strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS or (prompt and prompt in answer):
        return 0.0
    try:
        if isinstance(spec.get("metadata"), dict):
            entry = {"question": str(sample.get("prompt") or ""), "answer": sample.get("answer") or None, "metadata": spec["metadata"]}
        else:
            entry = entry_of(spec)
            if prompt and str(entry["question"]).strip() != prompt:  # the row and the spec disagree: trust neither
                raise ValueError(f"entry {spec['index']} of {spec['dataset']} is not this task's question")
        score = _dataset(spec["dataset"], json.dumps(spec["config"], sort_keys=True)).score_answer(answer, entry)
    except Exception as e:  # the scorer's failure is the completion's 0, never the run's crash
        _warn_once(str(spec.get("dataset")), f"{type(e).__name__}: {str(e)[:200]}")
        return 0.0
    return 1.0 if isinstance(score, (int, float)) and score >= 1.0 else 0.0
