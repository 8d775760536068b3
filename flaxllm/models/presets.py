"""Named model presets with the published shapes. `get('llama3_8b', scan_layers=True)`."""
from __future__ import annotations

from flaxllm.models.config import ModelConfig

_GPT2 = dict(vocab_size=50257, max_seq_len=1024, position='learned', norm='layernorm',
             norm_eps=1e-5, mlp_activation='gelu_tanh', attn_bias=True, mlp_bias=True,
             tie_embeddings=True)
_LLAMA1 = dict(vocab_size=32000, max_seq_len=2048, norm_eps=1e-6)
_LLAMA2 = dict(vocab_size=32000, max_seq_len=4096, norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_seq_len=8192, norm_eps=1e-5, rope_theta=500000.0)
_LLAMA31 = dict(_LLAMA3, max_seq_len=131072,
                rope_scaling=dict(type='llama3', factor=8.0, low_freq_factor=1.0,
                                  high_freq_factor=4.0, original_max_position_embeddings=8192))
_LLAMA32 = dict(_LLAMA31, tie_embeddings=True,
                rope_scaling=dict(_LLAMA31['rope_scaling'], factor=32.0))


def _shape(d, layers, heads, mlp, kv=None):
  return dict(d_model=d, num_layers=layers, num_heads=heads, mlp_dim=mlp, num_kv_heads=kv)


PRESETS: dict[str, dict] = {
    # GPT-2 (Radford et al. 2019).
    'gpt2': dict(_GPT2, **_shape(768, 12, 12, 3072)),
    'gpt2_medium': dict(_GPT2, **_shape(1024, 24, 16, 4096)),
    'gpt2_large': dict(_GPT2, **_shape(1280, 36, 20, 5120)),
    'gpt2_xl': dict(_GPT2, **_shape(1600, 48, 25, 6400)),
    # LLaMA 1 (Touvron et al. 2023a).
    'llama1_7b': dict(_LLAMA1, **_shape(4096, 32, 32, 11008)),
    'llama1_13b': dict(_LLAMA1, **_shape(5120, 40, 40, 13824)),
    'llama1_33b': dict(_LLAMA1, **_shape(6656, 60, 52, 17920)),
    'llama1_65b': dict(_LLAMA1, **_shape(8192, 80, 64, 22016)),
    # Llama 2.
    'llama2_7b': dict(_LLAMA2, **_shape(4096, 32, 32, 11008)),
    'llama2_13b': dict(_LLAMA2, **_shape(5120, 40, 40, 13824)),
    'llama2_70b': dict(_LLAMA2, **_shape(8192, 80, 64, 28672, kv=8)),
    # Llama 3, 3.1, 3.2.
    'llama3_8b': dict(_LLAMA3, **_shape(4096, 32, 32, 14336, kv=8)),
    'llama3_70b': dict(_LLAMA3, **_shape(8192, 80, 64, 28672, kv=8)),
    'llama3.1_8b': dict(_LLAMA31, **_shape(4096, 32, 32, 14336, kv=8)),
    'llama3.1_70b': dict(_LLAMA31, **_shape(8192, 80, 64, 28672, kv=8)),
    'llama3.1_405b': dict(_LLAMA31, **_shape(16384, 126, 128, 53248, kv=8)),
    'llama3.2_1b': dict(_LLAMA32, head_dim=64, **_shape(2048, 16, 32, 8192, kv=8)),
    'llama3.2_3b': dict(_LLAMA32, head_dim=128, **_shape(3072, 28, 24, 8192, kv=8)),
    # The original Transformer, base model (Vaswani et al. 2017): post-norm, ReLU, shared
    # embeddings scaled by sqrt(d_model), sinusoidal positions.
    'transformer_base': dict(arch='encoder_decoder', vocab_size=37000, d_model=512,
                             num_layers=6, num_heads=8, mlp_dim=2048, mlp_activation='relu',
                             norm='layernorm', norm_eps=1e-6, norm_position='post',
                             attn_bias=True, mlp_bias=True, position='sinusoidal',
                             tie_embeddings=True, scale_embeddings=True, dropout=0.1,
                             max_seq_len=512),
    # Tiny models for tests and debugging.
    'tiny_llama': dict(vocab_size=256, max_seq_len=128, **_shape(64, 2, 4, 128, kv=2)),
    'tiny_gpt2': dict(_GPT2, vocab_size=256, max_seq_len=128, **_shape(64, 2, 4, 256)),
    'tiny_transformer': dict(arch='encoder_decoder', vocab_size=32, d_model=64, num_layers=2,
                             num_heads=4, mlp_dim=128, mlp_activation='relu', norm='layernorm',
                             norm_position='post', attn_bias=True, mlp_bias=True,
                             position='sinusoidal', tie_embeddings=True,
                             scale_embeddings=True, max_seq_len=64),
}


def get(name: str, **overrides) -> ModelConfig:
  """The preset `name` as a validated ModelConfig, with field overrides."""
  if name not in PRESETS:
    raise KeyError(f'unknown model preset {name!r}; available: {", ".join(sorted(PRESETS))}.')
  return ModelConfig.from_dict({**PRESETS[name], **overrides})
