"""Preference alignment and RLHF objectives (reward models, DPO and relatives, KTO, GRPO, PPO).

  losses.py   the pure JAX losses they are built from, over per-sequence or per-token
              log-probabilities, each checked number for number against TRL
              (tests/test_align_losses.py)
"""
