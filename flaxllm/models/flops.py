"""Parameter and FLOP counts from a ModelConfig (used for MFU and scaling laws).

Conventions:
- `param_count` counts every parameter; `non_embedding` removes the token embedding, the
  untied output head and the learned position table (Kaplan et al. 2020's N).
- `flops_per_token` counts training FLOPs (forward + backward = 3x forward) per token:
  6 * N_matmul, where N_matmul is every weight used in a matmul (all layer weights and the
  output head; not the embedding lookups, norms or biases), plus the attention term
  12 * layers * seq_len * heads * head_dim (QK^T and AV, 2 FLOPs per MAC, x3 for training),
  halved for causal attention, which only computes the lower triangle.
"""
from __future__ import annotations

from flaxllm.models.config import ModelConfig


def _norm_params(cfg: ModelConfig) -> int:
  return cfg.d_model * (2 if cfg.norm == 'layernorm' else 1)


def _attention_params(cfg: ModelConfig) -> tuple[int, int]:
  """(matmul weights, biases) of one attention sublayer."""
  q_dim = cfg.num_heads * cfg.dim_per_head
  kv_dim = cfg.kv_heads * cfg.dim_per_head
  weights = cfg.d_model * (2 * q_dim + 2 * kv_dim)
  biases = (q_dim + 2 * kv_dim + cfg.d_model) if cfg.attn_bias else 0
  return weights, biases


def _mlp_params(cfg: ModelConfig) -> tuple[int, int]:
  n_in = 2 if cfg.mlp_activation == 'swiglu' else 1
  weights = (n_in + 1) * cfg.d_model * cfg.mlp_dim
  biases = (n_in * cfg.mlp_dim + cfg.d_model) if cfg.mlp_bias else 0
  return weights, biases


def _layer_params(cfg: ModelConfig, cross_attention: bool) -> tuple[int, int]:
  """(matmul weights, other params) of one block."""
  n_attn = 2 if cross_attention else 1
  aw, ab = _attention_params(cfg)
  mw, mb = _mlp_params(cfg)
  return n_attn * aw + mw, n_attn * ab + mb + (n_attn + 1) * _norm_params(cfg)


def param_count(cfg: ModelConfig) -> dict:
  """{'total', 'non_embedding', 'matmul'} parameter counts."""
  layers = [(cfg.num_layers, cfg.arch == 'encoder_decoder')]
  if cfg.arch == 'encoder_decoder':
    layers.append((cfg.encoder_layers, False))
  matmul = other = 0
  for n, cross in layers:
    w, o = _layer_params(cfg, cross)
    matmul += n * w
    other += n * o
  if cfg.norm_position == 'pre':
    other += _norm_params(cfg) * len(layers)
  token_embed = (cfg.vocab_size + (cfg.source_vocab_size or 0)) * cfg.d_model
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  pos_table = cfg.max_seq_len * cfg.d_model if cfg.position == 'learned' else 0
  total = matmul + other + token_embed + head + pos_table
  return dict(total=total, non_embedding=matmul + other, matmul=matmul + cfg.vocab_size * cfg.d_model)


def flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True,
                    training: bool = True) -> float:
  """Training (or, with training=False, forward) FLOPs per token at sequence length seq_len."""
  n_attn_layers = cfg.num_layers + (cfg.encoder_layers if cfg.arch == 'encoder_decoder' else 0)
  forward = 2 * param_count(cfg)['matmul']
  attention = 4 * n_attn_layers * seq_len * cfg.num_heads * cfg.dim_per_head
  if causal:
    attention /= 2
  if cfg.arch == 'encoder_decoder':  # cross-attention: decoder queries over the full source
    attention += 4 * cfg.num_layers * seq_len * cfg.num_heads * cfg.dim_per_head
  return (3 if training else 1) * (forward + attention)
