"""GGUF files for llama.cpp: flaxllm LLaMA-family and GPT-2 decoders with their tokenizer.

    vocab = flaxllm.interop.gguf.vocab_for(tokenizer, model_dir, cfg.vocab_size)
    flaxllm.interop.gguf.save(cfg, params, 'model.gguf', vocab=vocab, type='q8_0')

`flaxllm convert --from=DIR --to-gguf=FILE [--type=f32|f16|q8_0]` (flaxllm.interop.convert)
loads DIR and calls these. Written with the `gguf` library that the llama.cpp repository
maintains (`pip install 'flaxllm[gguf]'`), laid out as llama.cpp's own convert_hf_to_gguf.py lays
out the Hugging Face checkpoint of the same model: the params go through the Hugging Face tensor
layout of `flaxllm.interop.hf` (PyTorch `[out, in]` weights), and GGUF names come from the
`gguf` library's tensor name map. Shapes below are numpy's (GGUF lists dimensions in the other
order).

  LLaMA (arch 'llama'): token_embd [V, D]; blk.N.attn_q [h*d, D], attn_k / attn_v [kv*d, D],
    attn_output [D, h*d], ffn_gate / ffn_up [F, D], ffn_down [D, F], attn_norm, ffn_norm;
    output_norm; output [V, D], left out when the embeddings are tied (llama.cpp then uses
    token_embd). attn_q and attn_k are the Hugging Face q_proj / k_proj weights with the rows of
    each head reordered (`permute_qk`, llama.cpp's LlamaModel.permute): flaxllm and Hugging Face
    rotate dims i and i + d/2 of a head together (rotate-half RoPE), llama.cpp rotates dims 2i
    and 2i + 1, so row 2i + j of a head in the file is row i + j*d/2 of flaxllm's. Llama-3.1 RoPE
    scaling is the tensor rope_freqs [d/2] (the factor llama.cpp divides each frequency by, as
    convert_hf_to_gguf.py computes it), linear scaling the keys rope.scaling.type/factor.
  GPT-2 (arch 'gpt2'): token_embd, position_embd [max_seq_len, D], blk.N.attn_qkv [3D, D]
    (q, k, v stacked), attn_output [D, D], ffn_up [F, D], ffn_down [D, F], attn_norm, ffn_norm,
    output_norm (each with its bias); output [V, D] only when untied.

Types: f32 writes every tensor as float32 (exact); f16 writes the 2-D weights as float16; q8_0
writes the 2-D weights whose rows are a multiple of 32 long as Q8_0 (blocks of 32 int8 values
and one float16 scale; about 8.5 bits per weight), other 2-D weights as float16. Norm scales,
biases, rope_freqs and GPT-2's position table stay float32 in every type, as in
convert_hf_to_gguf.py.

The tokenizer goes into the file (`vocab_for`):
  a SentencePiece model (flaxllm's tokenizer.model, or a Hugging Face tokenizer.model): model
    'llama' with every piece, score and type, the BOS/EOS/UNK/PAD ids, add_bos (flaxllm starts
    prompts with BOS) and add_space_prefix as the model's add_dummy_prefix (off in flaxllm's).
  flaxllm's bytes tokenizer (PAD 0, BOS 1, EOS 2, byte b -> b + 3): model 'llama' with
    <pad>, <s>, </s> as control tokens and the byte token <0xNN> of every byte but the space,
    which is the normal token '\u2581': llama.cpp's SentencePiece tokenizer turns every space into
    '\u2581' before looking tokens up and falls back to <0xNN> for anything else, so it encodes and
    decodes text to flaxllm's ids (a literal '\u2581' in a text becomes a space, as with any
    SentencePiece model in llama.cpp).
  a Hugging Face byte-level BPE tokenizer.json (GPT-2, Llama 3): model 'gpt2' with the tokens,
    merges, token types (special added tokens are control tokens), the pre-tokenizer llama.cpp
    knows it by ('gpt-2' or 'llama-bpe', from the split regex) and the special tokens and
    chat template of tokenizer_config.json (gguf.SpecialVocab).
Ids past the tokenizer's size, up to the model's vocab_size, are unused '[PADi]' tokens.

Everything is checked before the file is written (`gguf_arch` refuses what GGUF's llama / gpt2
cannot express, in one sentence), the file is written beside the destination under a temporary
name and renamed into place at the end, and an existing file is replaced only with
`overwrite=True`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Iterator, Optional

import flax.linen as nn
import numpy as np
import sentencepiece as spm

from flaxllm.interop import hf
from flaxllm.models.config import ModelConfig

__all__ = ['save', 'gguf_arch', 'gguf_tensors', 'permute_qk', 'rope_freq_factors', 'Vocab',
           'vocab_for', 'vocab_from_sentencepiece', 'vocab_from_bytes', 'vocab_from_hf',
           'check_destination', 'GGUFExportError', 'TYPES', 'INSTALL_HINT']

TYPES = ('f32', 'f16', 'q8_0')
INSTALL_HINT = "pip install 'flaxllm[gguf]'"
SPM_SPACE = '\u2581'
Q8_0_BLOCK = 32

# Pre-tokenizer split regexes of the byte-level BPE tokenizers llama.cpp knows by name.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}"
                r"\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFExportError(ValueError):
  """A model, tokenizer or destination that cannot be written as GGUF; the message says why."""


def _lib():
  """The `gguf` library, or one sentence saying how to install it."""
  try:
    import gguf  # pylint: disable=import-outside-toplevel -- optional: the 'gguf' extra
  except ImportError:
    raise GGUFExportError(f'GGUF export needs the gguf library; install it with {INSTALL_HINT} '
                          '(or pip install gguf).') from None
  return gguf


# ============================================================================ architecture

def gguf_arch(model_config) -> str:
  """'llama' or 'gpt2': the llama.cpp architecture that computes what `model_config` computes;
  GGUFExportError in one sentence for a model neither expresses."""
  cfg = ModelConfig.from_dict(model_config)

  def bad(why):
    raise GGUFExportError(f'this model cannot be written as GGUF for llama.cpp: {why}.')
  if cfg.arch != 'decoder':
    bad(f"arch={cfg.arch!r} is an encoder-decoder model, and GGUF's llama and gpt2 are "
        'decoder-only')
  if cfg.norm_position != 'pre':
    bad(f'norm_position={cfg.norm_position!r} (LLaMA and GPT-2 normalise before each block)')
  if cfg.scale_embeddings:
    bad('scale_embeddings=True has no LLaMA or GPT-2 equivalent')
  if cfg.sliding_window is not None:
    bad(f'sliding_window={cfg.sliding_window} (local attention) has no setting in GGUF llama')
  if cfg.position == 'rope':
    if cfg.mlp_activation != 'swiglu' or cfg.norm != 'rmsnorm':
      bad("a RoPE model must be LLaMA-shaped (mlp_activation='swiglu', norm='rmsnorm')")
    if cfg.attn_bias or cfg.mlp_bias:
      bad('attention or MLP biases are not part of the LLaMA layout this exporter writes')
    return 'llama'
  if cfg.position == 'learned':
    if cfg.norm != 'layernorm' or cfg.mlp_activation != 'gelu_tanh':
      bad("a learned-position model must be GPT-2-shaped (norm='layernorm', "
          "mlp_activation='gelu_tanh', the GELU llama.cpp's gpt2 computes)")
    if not (cfg.attn_bias and cfg.mlp_bias):
      bad('GPT-2 has attention and MLP biases (attn_bias=True, mlp_bias=True)')
    if cfg.kv_heads != cfg.num_heads or cfg.dim_per_head * cfg.num_heads != cfg.d_model:
      bad('GPT-2 needs num_kv_heads == num_heads and head_dim == d_model // num_heads')
    return 'gpt2'
  bad(f'position={cfg.position!r} (rope for LLaMA or learned for GPT-2)')
  raise AssertionError  # unreachable: bad() raises


# ============================================================================ tensors

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """A q_proj / k_proj weight [n_heads * d, D] with each head's rows reordered from rotate-half
  to adjacent-pair RoPE (llama.cpp's LlamaModel.permute): new row 2i + j = old row i + j*d/2."""
  return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
          .swapaxes(1, 2).reshape(w.shape))


def rope_freq_factors(model_config) -> Optional[np.ndarray]:
  """The rope_freqs tensor [head_dim // 2] of a Llama-3.1-scaled model (each frequency is
  divided by its factor: 1 for high frequencies, `factor` for low ones, interpolated between),
  computed as convert_hf_to_gguf.py does; None for other models."""
  cfg = ModelConfig.from_dict(model_config)
  s = cfg.rope_scaling
  if s is None or s.get('type') != 'llama3':
    return None
  d = cfg.dim_per_head
  freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
  factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
  old_len = s['original_max_position_embeddings']
  low_wavelen, high_wavelen = old_len / low, old_len / high
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(1.0)
    elif wavelen > low_wavelen:
      out.append(factor)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append(1 / ((1 - smooth) / factor + smooth))
  return np.asarray(out, np.float32)


def _hf_tensors(cfg: ModelConfig, params, family: str) -> Iterator[tuple[str, np.ndarray]]:
  """(Hugging Face name, float32 array in the Hugging Face layout) of every tensor; the param
  tree is checked against the config first (`hf.checked_leaves`)."""
  params = nn.meta.unbox(params)
  if set(params) == {'params'}:
    params = params['params']
  groups = hf.tensor_groups(family, cfg)
  try:
    leaves, scanned = hf.checked_leaves(cfg, params, groups)
  except hf.HFInteropError as e:
    raise GGUFExportError(str(e)) from e
  for g in groups:
    for name, arr in hf.group_tensors(g, leaves, scanned):
      yield name, arr.astype(np.float32, copy=False)


def gguf_tensors(model_config, params) -> list[tuple[str, np.ndarray]]:
  """(GGUF name, float32 array in the file's layout) of every tensor, in file order (see the
  module docstring for the layout and permutations)."""
  gguf = _lib()
  cfg = ModelConfig.from_dict(model_config)
  arch = gguf_arch(cfg)
  arch_id = gguf.MODEL_ARCH.LLAMA if arch == 'llama' else gguf.MODEL_ARCH.GPT2
  names = gguf.get_tensor_name_map(arch_id, cfg.num_layers)
  out = []
  for hf_name, arr in _hf_tensors(cfg, params, arch):
    base, suffix = hf_name.rsplit('.', 1)
    name = names.get_name(base)
    if name is None:   # every tensor of the two layouts is in gguf's map
      raise GGUFExportError(f'the gguf library has no GGUF name for {hf_name!r}; upgrade gguf.')
    if arch == 'llama' and base.endswith('self_attn.q_proj'):
      arr = permute_qk(arr, cfg.num_heads)
    elif arch == 'llama' and base.endswith('self_attn.k_proj'):
      arr = permute_qk(arr, cfg.kv_heads)
    elif arch == 'gpt2' and hf_name.endswith(('attn.c_attn.weight', 'attn.c_proj.weight',
                                              'mlp.c_fc.weight', 'mlp.c_proj.weight')):
      arr = arr.T   # GPT-2's Conv1D [in, out] -> [out, in]
    out.append((f'{name}.{suffix}', np.ascontiguousarray(arr, np.float32)))
  factors = rope_freq_factors(cfg) if arch == 'llama' else None
  if factors is not None:
    out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + '.weight', factors))
  return out


def _encode(name: str, arr: np.ndarray, type_: str, gguf):
  """(data, raw ggml type or None) of a tensor for `type_` (f32 / f16 / q8_0)."""
  keep_f32 = (type_ == 'f32' or arr.ndim < 2 or name.endswith('_norm.weight')
              or name.startswith(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + '.'))
  if keep_f32:
    return arr.astype(np.float32), None
  if type_ == 'q8_0' and arr.shape[-1] % Q8_0_BLOCK == 0:
    qtype = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype
  return arr.astype(np.float16), None


# ============================================================================ tokenizer

@dataclasses.dataclass
class Vocab:
  """The tokenizer as GGUF stores it (tokenizer.ggml.*)."""
  model: str                       # 'llama' (SentencePiece) | 'gpt2' (byte-level BPE)
  tokens: list[str]
  types: list[int]                 # gguf.TokenType values
  scores: Optional[list[float]] = None
  merges: Optional[list[str]] = None
  pre: str = 'default'
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  unk_id: Optional[int] = None
  pad_id: Optional[int] = None
  add_bos: Optional[bool] = None
  add_eos: Optional[bool] = None
  add_space_prefix: Optional[bool] = None
  chat_template: Optional[str] = None

  def write(self, writer) -> None:
    writer.add_tokenizer_model(self.model)
    writer.add_tokenizer_pre(self.pre)
    writer.add_token_list(self.tokens)
    if self.scores is not None:
      writer.add_token_scores(self.scores)
    writer.add_token_types(self.types)
    if self.merges:
      writer.add_token_merges(self.merges)
    for value, add in ((self.bos_id, writer.add_bos_token_id),
                       (self.eos_id, writer.add_eos_token_id),
                       (self.unk_id, writer.add_unk_token_id),
                       (self.pad_id, writer.add_pad_token_id)):
      if value is not None:
        add(int(value))
    for value, add in ((self.add_bos, writer.add_add_bos_token),
                       (self.add_eos, writer.add_add_eos_token),
                       (self.add_space_prefix, writer.add_add_space_prefix)):
      if value is not None:
        add(bool(value))
    if self.chat_template:
      writer.add_chat_template(self.chat_template)


def _padded(n: int, vocab_size: int, what: str):
  if n > vocab_size:
    raise GGUFExportError(f'the {what} has {n} tokens but the model only {vocab_size} '
                          '(vocab_size); export the tokenizer the model was trained with.')
  return ([f'[PAD{i}]' for i in range(vocab_size)], [-10000.0] * vocab_size)


def vocab_from_sentencepiece(model_proto: bytes, vocab_size: int) -> Vocab:
  """A SentencePiece model (serialized proto) as a 'llama' vocabulary of `vocab_size` ids."""
  gguf = _lib()
  t = gguf.TokenType
  sp = spm.SentencePieceProcessor(model_proto=bytes(model_proto))
  n = sp.get_piece_size()
  tokens, scores = _padded(n, vocab_size, 'SentencePiece model')
  types = [int(t.UNUSED)] * vocab_size
  for i in range(n):
    tokens[i] = sp.id_to_piece(i)
    scores[i] = float(sp.get_score(i))
    types[i] = int(t.UNKNOWN if sp.is_unknown(i) else t.CONTROL if sp.is_control(i)
                   else t.UNUSED if sp.is_unused(i) else t.BYTE if sp.is_byte(i) else t.NORMAL)
  first = sp.encode('a', out_type=str)
  ids = {k: (v if v >= 0 else None) for k, v in (('bos', sp.bos_id()), ('eos', sp.eos_id()),
                                                ('unk', sp.unk_id()), ('pad', sp.pad_id()))}
  return Vocab('llama', tokens, types, scores=scores, bos_id=ids['bos'], eos_id=ids['eos'],
               unk_id=ids['unk'], pad_id=ids['pad'], add_bos=ids['bos'] is not None,
               add_eos=False, add_space_prefix=bool(first) and first[0].startswith(SPM_SPACE))


def vocab_from_bytes(vocab_size: int) -> Vocab:
  """flaxllm's bytes tokenizer (PAD 0, BOS 1, EOS 2, byte b -> b + 3) as a 'llama' vocabulary
  that llama.cpp encodes and decodes to the same ids (see the module docstring)."""
  gguf = _lib()
  t = gguf.TokenType
  tokens, scores = _padded(259, vocab_size, 'bytes tokenizer')
  types = [int(t.UNUSED)] * vocab_size
  tokens[:3], types[:3], scores[:3] = ['<pad>', '<s>', '</s>'], [int(t.CONTROL)] * 3, [0.0] * 3
  for b in range(256):
    space = b == 0x20
    tokens[b + 3] = SPM_SPACE if space else f'<0x{b:02X}>'
    types[b + 3] = int(t.NORMAL if space else t.BYTE)
    scores[b + 3] = 0.0
  return Vocab('llama', tokens, types, scores=scores, bos_id=1, eos_id=2, pad_id=0,
               add_bos=True, add_eos=False, add_space_prefix=False)


def _bpe_pre(tj: dict, path: str) -> str:
  """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
  def bad(why):
    raise GGUFExportError(f'the tokenizer.json in {path!r} {why}; llama.cpp reads byte-level BPE '
                          'tokenizers that split like GPT-2 or Llama 3.')
  if tj.get('normalizer') is not None:
    bad('has a normalizer, which llama.cpp does not apply')
  pt = tj.get('pre_tokenizer') or {}
  parts = (pt.get('pretokenizers') or []) if pt.get('type') == 'Sequence' else [pt]
  levels = [p for p in parts if p.get('type') == 'ByteLevel']
  splits = [(p.get('pattern') or {}).get('Regex') for p in parts if p.get('type') == 'Split']
  if len(levels) != 1 or len(levels) + len(splits) != len(parts):
    bad('has a pre-tokenizer other than ByteLevel and one regex Split')
  if levels[0].get('add_prefix_space'):
    bad('adds a prefix space')
  use_regex = levels[0].get('use_regex', True)
  if (use_regex and not splits) or (splits == [GPT2_SPLIT] and not use_regex):
    return 'gpt-2'
  if splits == [LLAMA3_SPLIT] and not use_regex:
    return 'llama-bpe'
  bad('splits text with a regex llama.cpp does not know by name')
  raise AssertionError  # unreachable: bad() raises


def vocab_from_hf(path: str, vocab_size: int) -> Vocab:
  """The byte-level BPE tokenizer.json of the Hugging Face directory `path` (with its
  tokenizer_config.json) as a 'gpt2' vocabulary of `vocab_size` ids."""
  gguf = _lib()
  t = gguf.TokenType
  try:
    with open(os.path.join(path, 'tokenizer.json'), encoding='utf-8') as f:
      tj = json.load(f)
  except (OSError, ValueError) as e:
    raise GGUFExportError(f'the tokenizer.json in {path!r} cannot be read ({e}).') from None
  model = tj.get('model') or {}
  if model.get('type') != 'BPE' or not isinstance(model.get('vocab'), dict):
    raise GGUFExportError(f"the tokenizer.json in {path!r} is a {model.get('type')} tokenizer; "
                          'GGUF export reads byte-level BPE tokenizer.json files and '
                          'SentencePiece tokenizer.model files.')
  if not model.get('merges'):
    raise GGUFExportError(f'the tokenizer.json in {path!r} is a BPE without merges, which '
                          'llama.cpp cannot load.')
  pre = _bpe_pre(tj, path)
  by_id = {int(i): tok for tok, i in model['vocab'].items()}
  added = {int(a['id']): a for a in tj.get('added_tokens') or []}
  n = max([*by_id, *added], default=-1) + 1
  tokens, _ = _padded(n, vocab_size, 'tokenizer.json')
  types = [int(t.UNUSED)] * vocab_size
  for i, tok in by_id.items():
    tokens[i], types[i] = tok, int(t.NORMAL)
  for i, a in added.items():
    tokens[i] = a['content']
    types[i] = int(t.CONTROL if a.get('special') else t.USER_DEFINED)
  special = gguf.SpecialVocab(path, load_merges=True, n_vocab=vocab_size)
  ids = special.special_token_ids
  adds = special.add_special_token
  return Vocab('gpt2', tokens, types, merges=list(special.merges), pre=pre,
               bos_id=ids.get('bos'), eos_id=ids.get('eos'), unk_id=ids.get('unk'),
               pad_id=ids.get('pad'), add_bos=adds.get('bos'), add_eos=adds.get('eos'),
               chat_template=special.chat_template if isinstance(special.chat_template, str)
               else None)


def vocab_for(tokenizer, path: str, vocab_size: int) -> Vocab:
  """The Vocab of `tokenizer` (a flaxllm SentencePiece or bytes tokenizer, or None for the
  Hugging Face tokenizer.json in `path`) for a model of `vocab_size` ids."""
  from flaxllm.data import tokenizer as tok_lib  # pylint: disable=import-outside-toplevel -- heavy
  if isinstance(tokenizer, tok_lib.SentencePieceTokenizer):
    return vocab_from_sentencepiece(tokenizer.model_proto, vocab_size)
  if isinstance(tokenizer, tok_lib.ByteTokenizer):
    return vocab_from_bytes(vocab_size)
  if os.path.exists(os.path.join(path, 'tokenizer.json')):
    return vocab_from_hf(path, vocab_size)
  raise GGUFExportError(f'{path!r} holds no tokenizer that GGUF can store (a SentencePiece '
                        'tokenizer.model, flaxllm\'s bytes tokenizer or a Hugging Face '
                        'byte-level BPE tokenizer.json).')


# ============================================================================ the file

def check_destination(path: str, overwrite: bool) -> None:
  """Refuses `path` as the GGUF file to write if it is a directory, or exists and not
  `overwrite`."""
  if os.path.isdir(path):
    raise GGUFExportError(f'{path} is a directory; --to-gguf names the .gguf file to write.')
  if os.path.lexists(path) and not overwrite:
    raise GGUFExportError(f'{path} already exists; choose a new file name or pass --overwrite '
                          '(overwrite=True) to replace it.')


def save(model_config, params, path: str, *, vocab: Vocab, type: str = 'f32',
         overwrite: bool = False, name: str = '') -> dict:
  """Writes `params` of `model_config` with `vocab` as the GGUF file `path` for llama.cpp.

  Args:
    model_config: ModelConfig (or dict) of a LLaMA-family or GPT-2 decoder (`gguf_arch`).
    params: the params tree (unrolled or scanned layers; `{'params': ...}` and boxed leaves
      are accepted), e.g. from `flaxllm.rundir.load_params`.
    path: the .gguf file; written under a temporary name beside it and renamed into place.
    vocab: the tokenizer (`vocab_for`), with exactly `vocab_size` tokens.
    type: 'f32', 'f16' or 'q8_0' (see the module docstring).
    overwrite: replace an existing file at `path`.
    name: general.name in the file (default: the file's stem).

  Returns:
    {'path', 'bytes', 'tensors', 'type', 'arch'} of the written file.
  """
  gguf = _lib()
  cfg = ModelConfig.from_dict(model_config)
  arch = gguf_arch(cfg)
  if type not in TYPES:
    raise GGUFExportError(f'unknown GGUF type {type!r}; choose one of {", ".join(TYPES)}.')
  if len(vocab.tokens) != cfg.vocab_size or len(vocab.types) != cfg.vocab_size:
    raise GGUFExportError(f'the tokenizer has {len(vocab.tokens)} tokens but the model '
                          f'{cfg.vocab_size}; build the Vocab with vocab_size={cfg.vocab_size}.')
  path = os.path.abspath(os.fspath(path))
  check_destination(path, overwrite)
  tensors = gguf_tensors(cfg, params)   # checks the params before anything is written
  file_type = {'f32': gguf.LlamaFileType.ALL_F32, 'f16': gguf.LlamaFileType.MOSTLY_F16,
               'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[type]
  directory, base = os.path.split(path)
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{base}.{os.getpid()}.flaxllm-tmp')
  writer = None
  try:
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name or os.path.splitext(base)[0])
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.mlp_dim)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == 'llama':
      writer.add_layer_norm_rms_eps(cfg.norm_eps)
      writer.add_rope_freq_base(cfg.rope_theta)
      writer.add_rope_dimension_count(cfg.dim_per_head)
      writer.add_key_length(cfg.dim_per_head)
      writer.add_value_length(cfg.dim_per_head)
      if cfg.rope_scaling is not None and cfg.rope_scaling['type'] == 'linear':
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling['factor']))
    else:
      writer.add_layer_norm_eps(cfg.norm_eps)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    vocab.write(writer)
    for tname, arr in tensors:
      data, raw = _encode(tname, arr, type, gguf)
      writer.add_tensor(tname, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    size = os.path.getsize(tmp)
    _move_into_place(tmp, path, overwrite)
  finally:
    if writer is not None:
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
  return {'path': path, 'bytes': size, 'tensors': len(tensors), 'type': type, 'arch': arch}


def _move_into_place(tmp: str, path: str, overwrite: bool) -> None:
  """Renames `tmp` to `path`; without `overwrite`, never over a file that appeared meanwhile."""
  if overwrite:
    os.replace(tmp, path)
    return
  try:
    os.link(tmp, path)   # fails if `path` exists: no file is ever replaced
  except FileExistsError:
    raise GGUFExportError(f'{path} appeared while the GGUF file was written; it was left as it '
                          'is (pass --overwrite to replace it).') from None
  except OSError:        # a file system without hard links
    check_destination(path, overwrite)
    os.rename(tmp, path)
    return
  os.remove(tmp)


# ============================================================================ reading it back

def llama_cpp_model(path: str, **kwargs):
  """llama-cpp-python's `Llama(model_path=path, **kwargs)` with llama.cpp's extra buffer types
  (weight repacking, the AMX buffer) off. On AMX CPUs (Sapphire Rapids) a native llama.cpp build
  puts q8_0 weights in its AMX buffer and segfaults in the first matmul
  (ggml-org/llama.cpp#20824); llama-cpp-python 0.3.36 has no argument for the model param
  `use_extra_bufts`, so its default params are wrapped for this one load. Tokens and logits do
  not change; llama.cpp's repacked kernels (faster q8_0 on some CPUs) are not used."""
  from llama_cpp import llama as llama_module  # pylint: disable=import-outside-toplevel -- optional: the 'llamacpp' extra
  low_level = llama_module.llama_cpp
  default_params = low_level.llama_model_default_params

  def without_extra_buffers():
    params = default_params()
    params.use_extra_bufts = False
    return params

  low_level.llama_model_default_params = without_extra_buffers
  try:
    return llama_module.Llama(model_path=path, **kwargs)
  finally:
    low_level.llama_model_default_params = default_params
