"""Reinforcement-learning pieces that need no model and no Ray: GRPO advantages and loss
(rl/grpo.py), verifiable rewards (rl/rewards/: math, code, format, overlong, a registry of
live-reloaded reward files run in killable worker processes, the second opinion on code rewards),
the code sandbox (rl/sandbox/) and the RewardEvaluator (rl/evaluator.py).

Test: `pytest tests/rl/`.
"""
