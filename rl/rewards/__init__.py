"""Verifiable rewards. Now: the math reward (rl/rewards/math.py); the registry, code, format and
overlong rewards arrive with the rest of issue #6.
"""
