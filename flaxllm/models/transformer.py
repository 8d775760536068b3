"""Transformer models: the decoder-only LM (GPT-2, LLaMA 1/2/3/3.1/3.2) and the original
encoder-decoder Transformer (Vaswani et al. 2017), both built from one `Stack` of `Block`s.

Parameter tree of a decoder (`/`-joined paths; `layers_{i}` becomes `layers` with a leading
[layers] axis when `scan_layers=True`):
  embed/embedding                      [vocab, embed]
  pos_embed/embedding                  [max_seq_len, embed]      (position='learned')
  decoder/layers_0/attn_norm/scale     [embed]                   (+ bias for LayerNorm)
  decoder/layers_0/attn/{q,k,v}_proj/kernel  [embed, heads|kv_heads, head_dim]
  decoder/layers_0/attn/o_proj/kernel  [heads, head_dim, embed]
  decoder/layers_0/mlp_norm/scale      [embed]
  decoder/layers_0/mlp/{gate,up}_proj/kernel [embed, mlp];  mlp/down_proj/kernel [mlp, embed]
  decoder/final_norm/scale             [embed]                   (pre-norm models)
  lm_head/kernel                       [embed, vocab]            (unless tie_embeddings)
The encoder-decoder adds encoder/... (same block without causality) and cross_attn in the
decoder blocks.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxllm.models.attention import Attention
from flaxllm.models.config import ModelConfig
from flaxllm.models.layers import MLP, constrain, dense, embed, norm, sinusoidal_positions

REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nn.Module):
  """One transformer layer: self-attention, optional cross-attention, MLP; pre- or post-norm.

  (x [batch, seq, embed], ...) -> (x, None); the `(carry, None)` form lets `nn.scan` stack it.
  """
  cfg: ModelConfig
  causal: bool = True
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids, encoded=None, encoded_segment_ids=None):
    cfg = self.cfg
    use_rope = cfg.position == 'rope'

    def residual(name, sublayer, x):
      drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
      if cfg.norm_position == 'pre':
        return x + drop(sublayer(norm(cfg, f'{name}_norm')(x)))
      return norm(cfg, f'{name}_norm')(x + drop(sublayer(x)))

    self_attn = Attention(cfg, causal=self.causal, use_rope=use_rope, decode=self.decode,
                          name='attn')
    x = residual('attn', lambda y: self_attn(y, positions, segment_ids), x)
    if self.cross_attention:
      cross = Attention(cfg, causal=False, name='cross_attn')
      x = residual('cross_attn',
                   lambda y: cross(y, positions, segment_ids, encoded, encoded_segment_ids), x)
    x = residual('mlp', MLP(cfg, name='mlp'), x)
    return constrain(x, ('batch', 'length', 'embed')), None


class Stack(nn.Module):
  """`num` Blocks, unrolled or scanned, with optional remat, then the final norm (pre-norm)."""
  cfg: ModelConfig
  num: int
  causal: bool = True
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids, encoded=None, encoded_segment_ids=None):
    cfg = self.cfg
    block = Block
    if cfg.remat != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    kw = dict(causal=self.causal, cross_attention=self.cross_attention, decode=self.decode,
              deterministic=self.deterministic)
    args = (positions, segment_ids, encoded, encoded_segment_ids)
    if cfg.scan_layers:
      stacked = nn.scan(block, variable_axes={'params': 0, 'cache': 0},
                        split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * len(args), length=self.num,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stacked(cfg, **kw, name='layers')(x, *args)
    else:
      for i in range(self.num):
        x, _ = block(cfg, **kw, name=f'layers_{i}')(x, *args)
    if cfg.norm_position == 'pre':
      x = norm(cfg, 'final_norm')(x)
    return x


def embed_inputs(cfg: ModelConfig, token_embed, pos_embed, dropout, tokens, positions):
  """Token embedding (optionally scaled by sqrt(d_model)) plus absolute positions, then
  dropout: [batch, seq] -> [batch, seq, embed]."""
  x = token_embed(tokens)
  if cfg.scale_embeddings:
    x = x * math.sqrt(cfg.d_model)
  if cfg.position == 'learned':
    x = x + pos_embed(positions)
  elif cfg.position == 'sinusoidal':
    x = x + sinusoidal_positions(positions, cfg.d_model).astype(x.dtype)
  return constrain(dropout(x), ('batch', 'length', 'embed'))


def default_positions(tokens, positions=None):
  """`positions`, or 0..seq-1 for every row of `tokens` [batch, seq]."""
  if positions is not None:
    return positions
  return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class _Embedded(nn.Module):
  """What every model here shares: the token embedding `embed` (also the tied output head),
  the learned position table `pos_embed` (position='learned') and the embedding dropout.
  Subclasses call `setup_embeddings()` in their `setup`; parameter names stay top-level."""
  cfg: ModelConfig
  deterministic: bool = True

  def setup_embeddings(self):
    cfg = self.cfg
    self.embed = embed(cfg, cfg.vocab_size, ('vocab', 'embed'), name='embed')
    self.pos_embed = (embed(cfg, cfg.max_seq_len, ('length', 'embed'), name='pos_embed')
                      if cfg.position == 'learned' else None)
    self.dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    self.lm_head = (None if cfg.tie_embeddings else
                    dense(cfg, (cfg.vocab_size,), ('embed', 'vocab'), bias=False,
                          name='lm_head'))

  def embed_tokens(self, tokens, positions):
    return embed_inputs(self.cfg, self.embed, self.pos_embed, self.dropout, tokens, positions)

  def head(self, hidden):
    """The output head: hidden states [..., embed] -> logits [..., vocab] (the tied token
    embedding, or `lm_head`); reads only those params."""
    logits = self.embed.attend(hidden) if self.cfg.tie_embeddings else self.lm_head(hidden)
    logits = logits.astype(jnp.dtype(self.cfg.logits_dtype))
    return constrain(logits, ('batch', 'length', 'vocab')) if logits.ndim == 3 else logits


class Decoder(_Embedded):
  """Decoder-only language model (GPT-2, LLaMA family).

  tokens [batch, seq] int32 -> logits [batch, seq, vocab]. `positions` [batch, seq] default to
  0..seq-1; `segment_ids` [batch, seq] keep packed documents apart (0 = padding). With
  `decode=True` keys/values go to the 'cache' collection (see `flaxllm.generate`).

  Public seams (`model.apply(..., method=...)`): `hidden_states` (the final normed hidden
  states [batch, seq, embed]) and `head` (hidden states -> logits), whose composition is
  `__call__`; chunked losses, distillation and reward/value heads build on them.
  """
  decode: bool = False

  def setup(self):
    self.setup_embeddings()
    self.decoder = Stack(self.cfg, self.cfg.num_layers, causal=True, decode=self.decode,
                         deterministic=self.deterministic, name='decoder')

  def __call__(self, tokens, positions=None, segment_ids=None):
    return self.head(self.hidden_states(tokens, positions, segment_ids))

  def hidden_states(self, tokens, positions=None, segment_ids=None):
    positions = default_positions(tokens, positions)
    return self.decoder(self.embed_tokens(tokens, positions), positions, segment_ids)


class EncoderDecoder(_Embedded):
  """The original Transformer: a bidirectional encoder and a causal decoder with
  cross-attention, sharing one token embedding (or, with `source_vocab_size`, the encoder
  embeds the source with its own `source_embed`).

  (src [batch, src_seq], tgt [batch, tgt_seq]) -> logits [batch, tgt_seq, vocab]; segment ids
  (0 = padding) and positions default as in `Decoder`. Public seams: `encode` (source ->
  encoded states) and `decode_logits` (target prefix + encoded source -> logits); with
  `decode=True` the decoder's self-attention keys/values go to the 'cache' collection, one
  target token at a time (`flaxllm.generate`), while cross-attention reads the encoded source.
  """
  decode: bool = False

  def setup(self):
    cfg = self.cfg
    self.setup_embeddings()
    self.source_embed = (None if cfg.source_vocab_size is None else
                         embed(cfg, cfg.source_vocab_size, ('vocab', 'embed'),
                               name='source_embed'))
    self.encoder = Stack(cfg, cfg.encoder_layers, causal=False,
                         deterministic=self.deterministic, name='encoder')
    self.decoder = Stack(cfg, cfg.num_layers, causal=True, cross_attention=True,
                         decode=self.decode, deterministic=self.deterministic, name='decoder')

  def __call__(self, src, tgt, src_segment_ids=None, tgt_segment_ids=None, src_positions=None,
               tgt_positions=None):
    encoded = self.encode(src, src_segment_ids, src_positions)
    return self.decode_logits(tgt, encoded, src_segment_ids, tgt_segment_ids, tgt_positions)

  def encode(self, src, src_segment_ids=None, src_positions=None):
    """Encoded source [batch, src_seq, embed]."""
    src_positions = default_positions(src, src_positions)
    token_embed = self.embed if self.source_embed is None else self.source_embed
    x = embed_inputs(self.cfg, token_embed, self.pos_embed, self.dropout, src, src_positions)
    return self.encoder(x, src_positions, src_segment_ids)

  def decode_logits(self, tgt, encoded, src_segment_ids=None, tgt_segment_ids=None,
                    tgt_positions=None):
    """Logits [batch, tgt_seq, vocab] of the target tokens given the encoded source."""
    tgt_positions = default_positions(tgt, tgt_positions)
    y = self.decoder(self.embed_tokens(tgt, tgt_positions), tgt_positions, tgt_segment_ids,
                     encoded, src_segment_ids)
    return self.head(y)
