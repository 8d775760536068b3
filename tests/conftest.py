"""Test set-up: 8 fake CPU devices (for sharding tests) and full-precision matmuls."""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('WANDB_MODE', 'offline')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
