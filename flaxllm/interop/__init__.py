"""Checkpoint interop: Hugging Face transformers (`hf`) and the flaxllm directory (`native`)."""
from flaxllm.interop import hf, native
from flaxllm.interop.hf import HFInteropError, convert_main
from flaxllm.interop.native import load_flaxllm, save_flaxllm

__all__ = ['hf', 'native', 'HFInteropError', 'convert_main', 'load_flaxllm', 'save_flaxllm']
