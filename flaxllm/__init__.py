"""flaxllm: a JAX/Flax research framework for large language models."""

__version__ = "0.1.0"
