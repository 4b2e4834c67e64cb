"""Reinforcement-learning pieces that need no model and no Ray: GRPO advantages and loss
(rl/grpo.py), verifiable rewards (rl/rewards/: math, code, format, overlong, a registry of
live-reloaded reward files), the code sandbox (rl/sandbox.py) and the RewardEvaluator.

Test: `pytest tests/rl/`.
"""
