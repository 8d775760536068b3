"""Model configuration: one frozen dataclass for every architecture, validated on creation.

Fields map one-to-one to `config.model.*` in ml-collections files, so
`--config.model.num_layers=4` works; unknown keys are rejected by `ModelConfig.from_dict`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ml_collections import ConfigDict, config_dict

from flaxllm.kernels import IMPLS as ATTENTION_IMPLS


class ConfigError(ValueError):
  """A configuration that cannot work; the message names the key and the fix."""


def require(ok: bool, message: str) -> None:
  """ConfigError(`message`) unless `ok`: how every config section states its checks."""
  if not ok:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Architecture.
  arch: str = 'decoder'                 # 'decoder' (GPT-2, LLaMA) | 'encoder_decoder' (Vaswani)
  vocab_size: int = 32000
  source_vocab_size: Optional[int] = None  # encoder_decoder: a separate source vocabulary and
  #                                          embedding (None: one embedding for both sides)
  d_model: int = 4096                   # residual width ('embed')
  num_layers: int = 32                  # decoder layers (and encoder layers for encoder_decoder)
  num_encoder_layers: Optional[int] = None  # encoder_decoder only; defaults to num_layers
  num_heads: int = 32
  num_kv_heads: Optional[int] = None    # GQA/MQA; defaults to num_heads
  head_dim: Optional[int] = None        # defaults to d_model // num_heads
  mlp_dim: int = 11008
  mlp_activation: str = 'swiglu'        # 'swiglu' | 'gelu' | 'gelu_tanh' | 'relu'
  norm: str = 'rmsnorm'                 # 'rmsnorm' | 'layernorm'
  norm_eps: float = 1e-5
  norm_position: str = 'pre'            # 'pre' (GPT-2, LLaMA) | 'post' (Vaswani 2017)
  attn_bias: bool = False               # biases on q/k/v/o projections
  mlp_bias: bool = False
  tie_embeddings: bool = False          # output head shares the token embedding
  scale_embeddings: bool = False        # multiply embeddings by sqrt(d_model) (Vaswani)
  # Positions.
  position: str = 'rope'                # 'rope' | 'learned' | 'sinusoidal'
  max_seq_len: int = 2048               # learned position table size; the longest sequence
  rope_theta: float = 10000.0
  rope_scaling: Optional[dict] = None   # None | {'type': 'linear', 'factor'} |
  #   {'type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor',
  #    'original_max_position_embeddings'}
  sliding_window: Optional[int] = None  # Mistral-style local attention (None = full)
  # Numerics and execution.
  dtype: str = 'float32'                # compute dtype, e.g. 'bfloat16'
  param_dtype: str = 'float32'
  logits_dtype: str = 'float32'
  init_std: float = 0.02
  dropout: float = 0.0
  scan_layers: bool = False             # stack layer params on a leading 'layers' axis
  remat: str = 'none'                   # 'none' | 'full' | 'dots' | 'dots_no_batch'
  attention_impl: str = 'auto'          # 'auto' | 'xla' | 'blocked' | 'cudnn' | 'pallas'

  def __post_init__(self):
    self.validate()

  # Derived sizes.
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def encoder_layers(self) -> int:
    return self.num_encoder_layers if self.num_encoder_layers is not None else self.num_layers

  def validate(self):
    choices = dict(arch=('decoder', 'encoder_decoder'),
                   mlp_activation=('swiglu', 'gelu', 'gelu_tanh', 'relu'),
                   norm=('rmsnorm', 'layernorm'), norm_position=('pre', 'post'),
                   position=('rope', 'learned', 'sinusoidal'),
                   remat=('none', 'full', 'dots', 'dots_no_batch'),
                   attention_impl=ATTENTION_IMPLS)
    for key, allowed in choices.items():
      if getattr(self, key) not in allowed:
        raise ConfigError(f'model.{key}={getattr(self, key)!r} is not supported; '
                          f'choose one of {allowed}.')
    for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_dim', 'max_seq_len'):
      if getattr(self, key) <= 0:
        raise ConfigError(f'model.{key} must be positive, got {getattr(self, key)}.')
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ConfigError(f'model.num_heads={self.num_heads} does not divide model.d_model='
                        f'{self.d_model}; pick a divisor of d_model or set model.head_dim.')
    if self.num_heads % self.kv_heads:
      raise ConfigError(f'model.num_kv_heads={self.kv_heads} does not divide model.num_heads='
                        f'{self.num_heads}; pick a divisor of num_heads.')
    if self.position == 'rope' and self.dim_per_head % 2:
      raise ConfigError(f'RoPE needs an even head dim, got {self.dim_per_head}; '
                        'change model.head_dim (or d_model / num_heads).')
    if self.position == 'sinusoidal' and self.d_model % 2:
      raise ConfigError(f'sinusoidal positions need an even model.d_model, got {self.d_model}.')
    if self.rope_scaling is not None:
      kind = self.rope_scaling.get('type')
      needed = {'linear': ('factor',),
                'llama3': ('factor', 'low_freq_factor', 'high_freq_factor',
                           'original_max_position_embeddings')}
      if kind not in needed:
        raise ConfigError(f"model.rope_scaling type {kind!r} is not supported; use 'linear' "
                          "or 'llama3' (or None).")
      missing = [k for k in needed[kind] if k not in self.rope_scaling]
      if missing:
        raise ConfigError(f'model.rope_scaling of type {kind!r} is missing {missing}.')
    if self.source_vocab_size is not None and (self.arch != 'encoder_decoder' or
                                               self.source_vocab_size <= 0):
      raise ConfigError(f'model.source_vocab_size={self.source_vocab_size} is for the source '
                        "side of model.arch='encoder_decoder' models and must be positive; "
                        'leave it unset for one shared vocabulary.')
    if self.arch == 'encoder_decoder' and self.position == 'rope':
      raise ConfigError("model.arch='encoder_decoder' uses absolute positions; set "
                        "model.position to 'sinusoidal' or 'learned'.")

  @classmethod
  def from_dict(cls, d: Any) -> 'ModelConfig':
    """From a dict or ConfigDict; unknown keys are an error naming the key."""
    if isinstance(d, ModelConfig):
      return d
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ConfigError(f'unknown model config key(s) {unknown}; known keys are '
                        f'{sorted(known)}.')
    if d.get('rope_scaling') is not None:
      d['rope_scaling'] = dict(d['rope_scaling'])
    return cls(**d)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def __hash__(self):  # rope_scaling is a dict; hash its items so Linen can hash the config
    d = self.to_dict()
    d['rope_scaling'] = tuple(sorted((self.rope_scaling or {}).items()))
    return hash(tuple(sorted(d.items())))


def config_section():
  """`config.model`: every ModelConfig field with its default (None-valued fields are typed
  placeholders, so `--config.model.num_kv_heads=2` converts its text)."""
  c = ConfigDict(ModelConfig().to_dict())
  for f in dataclasses.fields(ModelConfig):
    if f.default is None:
      kind = dict if f.name == 'rope_scaling' else int
      c[f.name] = config_dict.placeholder(kind)
  return c
