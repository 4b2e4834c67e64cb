"""Reinforcement-learning pieces that need no model and no Ray: GRPO advantages and loss
(rl/grpo.py); rewards and the code sandbox arrive with issue #6.

Test: `pytest tests/rl/`.
"""
