"""Sequence-to-sequence: the original encoder-decoder Transformer (Vaswani et al. 2017) trained
on (source, target) pairs (`objective='seq2seq'`, settings in `config.seq2seq`).

    flaxllm train --config=configs/transformer.py --workdir=runs/transformer

The loss is the decoder's next-token cross-entropy on the target given the encoded source,
with label smoothing (`seq2seq.label_smoothing`, 0.1 in the paper); `loss` / `val_loss` stay
the plain cross-entropy. Pairs come from `flaxllm.data.seq2seq` (JSONL records with
`data.source_key` / `data.target_key`, or a built-in task generated from the standard library,
`data.source='stdlib_pairs'`), one pair per row: sources of `seq2seq.source_len` positions,
targets of `seq_len`. With `seq2seq.shared_vocab` (the paper's setting) one tokenizer
(`config.tokenizer`, trained on both sides) encodes both and the model shares one embedding
between encoder, decoder and output head; otherwise the source side has its own tokenizer
(`seq2seq.source_tokenizer`, kept in the workdir as `source_tokenizer.*`) and embedding
(`model.source_vocab_size`).

Validation also decodes the first `seq2seq.eval_pairs` validation pairs (beam search with
`seq2seq.num_beams` and `length_penalty`, greedy with one beam) and reports `exact_match` (the
share of outputs equal to the target text), corpus `bleu` (sacreBLEU, its default 13a
tokenisation) and `chrf` (sacreBLEU's character n-gram F-score).
"""
from __future__ import annotations

from typing import Any, Callable

import jax.numpy as jnp
import numpy as np
import sacrebleu
from ml_collections import ConfigDict

from flaxllm import generate as generate_lib
from flaxllm import rundir
from flaxllm.data import seq2seq as seq2seq_data
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.models import losses
from flaxllm.models.config import ConfigError, require
from flaxllm.objectives import base


def config_section() -> ConfigDict:
  """`config.seq2seq` (objective='seq2seq')."""
  c = ConfigDict()
  c.source_len = 64                # source positions per row (targets: config.seq_len)
  c.shared_vocab = True            # one tokenizer and embedding for both sides (the paper's)
  c.source_tokenizer = tokenizer_lib.config_section()   # the source side's, if not shared
  c.label_smoothing = 0.1          # of the trained cross-entropy (Vaswani et al. 2017: 0.1)
  c.eval_pairs = 256               # validation pairs decoded for exact match and BLEU (0: none)
  c.eval_batch = 64                # pairs decoded at once (one compiled shape)
  c.num_beams = 4                  # beam search for them (1: greedy), as in the paper
  c.length_penalty = 0.6           # beam scores divided by length ** length_penalty
  return c


def forward(model, params, batch, rng=None):
  """The decoder's logits [batch, target, vocab] for a pair batch (dropout with `rng`)."""
  rngs = {'dropout': rng} if rng is not None else None
  return model.apply({'params': params}, batch['source'], batch['inputs'],
                     batch['source_segment_ids'], batch['segment_ids'],
                     batch['source_positions'], batch['positions'], rngs=rngs)


def seq2seq_loss(model, *, label_smoothing: float = 0.0, z_loss: float = 0.0,
                 model_params: Callable[[Any, Any], Any] = lambda params, frozen: params
                 ) -> base.LossFn:
  """The LossFn of an encoder-decoder model on pair batches: label-smoothed next-token
  cross-entropy of the targets (`sums['ce']` is the plain cross-entropy)."""
  def loss_fn(params, frozen, batch, rng=None):
    logits = forward(model, model_params(params, frozen), batch, rng)
    return losses.lm_sums(logits, batch, z_loss, label_smoothing)
  return loss_fn


class Seq2Seq(base.Objective):
  """`objective='seq2seq'`: an encoder-decoder model on (source, target) pairs."""
  name = 'seq2seq'
  section = 'seq2seq'
  arch = 'encoder_decoder'

  @classmethod
  def config_section(cls) -> ConfigDict:
    return config_section()

  @classmethod
  def check_section(cls, config) -> None:
    super().check_section(config)
    s = config.seq2seq
    require(config.data.source in seq2seq_data.SOURCES,
            f"objective='seq2seq' trains on (source, target) pairs but data.source="
            f"{config.data.source!r}; use one of {seq2seq_data.SOURCES} (JSONL pairs in "
            "data.path, or a built-in task in data.name).")
    require(s.source_len >= 2, f'seq2seq.source_len={s.source_len} must be at least 2 (a token '
                               'and EOS).')
    if config.model.position == 'learned':
      longest = max(s.source_len, config.seq_len)
      require(longest <= config.model.max_seq_len,
              f'seq2seq.source_len / seq_len ({longest}) exceed model.max_seq_len='
              f'{config.model.max_seq_len} (learned positions); raise model.max_seq_len.')
    require(0.0 <= s.label_smoothing < 1.0,
            f'seq2seq.label_smoothing={s.label_smoothing} must be in [0, 1); the paper uses 0.1.')
    require(s.eval_pairs >= 0 and s.eval_batch >= 1,
            'seq2seq.eval_pairs must be >= 0 and seq2seq.eval_batch >= 1.')
    require(1 <= s.num_beams <= config.model.vocab_size,
            f'seq2seq.num_beams={s.num_beams} must be between 1 (greedy) and the vocabulary '
            f'size {config.model.vocab_size}; use e.g. 4.')
    source_vocab = config.model.source_vocab_size
    if s.shared_vocab:
      require(source_vocab is None,
              f'model.source_vocab_size={source_vocab} is set but seq2seq.shared_vocab=True (one '
              'vocabulary); unset it, or set --config.seq2seq.shared_vocab=False.')
    else:
      require(source_vocab is not None,
              'seq2seq.shared_vocab=False needs the source embedding size; set '
              '--config.model.source_vocab_size=<at least the source tokenizer\'s vocabulary>.')
      tokenizer_lib.check_section(s.source_tokenizer, source_vocab)

  @classmethod
  def load_tokenizer(cls, workdir: str, config, reuse: bool):
    """The target side's tokenizer (trained on both sides with a shared vocabulary), or with
    separate vocabularies a `PairTokenizer` that also carries the source side's."""
    shared = config.seq2seq.shared_vocab
    target = rundir.run_tokenizer(workdir, config.tokenizer, seq2seq_data.side_texts(
        config.data, 'both' if shared else 'target'), reuse)
    if shared:
      return target
    source = rundir.run_tokenizer(workdir, config.seq2seq.source_tokenizer,
                                  seq2seq_data.side_texts(config.data, 'source'), reuse,
                                  stem=rundir.SOURCE_TOKENIZER)
    try:
      tokenizer_lib.check_vocab(source, config.model.source_vocab_size)
    except ValueError as e:
      raise ConfigError(f'source side: {e}') from e
    return seq2seq_data.PairTokenizer(target, source)

  def check(self, tokenizer) -> None:
    """The pair records have both fields (one sentence naming the file and the field)."""
    del tokenizer
    try:
      seq2seq_data.check_pairs(self.config.data)
    except ValueError as e:
      raise ConfigError(str(e)) from e

  # ---- the loss and the data -------------------------------------------------------------

  def train_loss(self, model) -> base.LossFn:
    return seq2seq_loss(model, label_smoothing=self.config.seq2seq.label_smoothing,
                        z_loss=self.config.z_loss, model_params=self.model_params)

  def data_iterator(self, tokenizer, split: str, *, seq_len: int, **kw):
    return seq2seq_data.make_pair_iterator(self.config.data, tokenizer, split=split,
                                           source_len=self.config.seq2seq.source_len,
                                           target_len=seq_len, **kw)

  def batch_shapes(self, batch_size: int, seq_len: int) -> dict:
    source = (batch_size, self.config.seq2seq.source_len)
    return {**super().batch_shapes(batch_size, seq_len), 'source': (source, jnp.int32),
            'source_segment_ids': (source, jnp.int32), 'source_positions': (source, jnp.int32)}

  # ---- decoding: validation metrics and the sample ----------------------------------------

  def translate(self, params, tokenizer, texts: list[str]) -> list[str]:
    """The model's outputs for source `texts`, decoded as validation decodes them (beam
    search or greedy) in batches of `seq2seq.eval_batch` of one shape."""
    s = self.config.seq2seq
    batch = min(s.eval_batch, len(texts))
    source_tokenizer = seq2seq_data.source_side(tokenizer)
    sources = [[*source_tokenizer.encode(t)[:s.source_len - 1], source_tokenizer.eos_id]
               for t in texts]
    kw = dict(max_new_tokens=self.config.seq_len, bos_id=tokenizer.bos_id,
              stop_tokens=(tokenizer.eos_id,), pad_id=source_tokenizer.pad_id,
              pad_to_multiple=s.source_len)
    outputs = []
    for start in range(0, len(sources), batch):
      chunk = sources[start:start + batch]
      padded = chunk + [chunk[0]] * (batch - len(chunk))    # every call has one shape
      if s.num_beams > 1:
        ids = generate_lib.beam_search_seq2seq(self.model_cfg, params, padded,
                                               num_beams=s.num_beams,
                                               length_penalty=s.length_penalty, **kw)
      else:
        ids = generate_lib.generate_seq2seq(self.model_cfg, params, padded, **kw)
      outputs += ids[:len(chunk)]
    return [tokenizer.decode([t for t in ids if t != tokenizer.eos_id]) for ids in outputs]

  def eval_metrics(self, plain_params: Callable[[], Any], tokenizer) -> dict:
    """`exact_match`, corpus `bleu` and `chrf` (sacreBLEU) of the first `seq2seq.eval_pairs`
    validation pairs (BLEU is 0 for one-word outputs, which have no 4-grams: chrF scores
    those)."""
    n = self.config.seq2seq.eval_pairs
    if not n:
      return {}
    pairs = seq2seq_data.pairs(self.config.data, 'validation')[:n]
    hypotheses = self.translate(plain_params(), tokenizer, [src for src, _ in pairs])
    references = [tgt for _, tgt in pairs]
    exact = float(np.mean([h == r for h, r in zip(hypotheses, references)]))
    return {'exact_match': exact, 'bleu': sacrebleu.corpus_bleu(hypotheses, [references]).score,
            'chrf': sacrebleu.corpus_chrf(hypotheses, [references]).score}

  def sample(self, plain_params: Callable[[], Any], tokenizer):
    """`sample.prompt` as a source, and the model's output for it."""
    prompt = self.config.sample.prompt
    if not self.config.sample.max_new_tokens:
      return None
    return f'{prompt} -> {self.translate(plain_params(), tokenizer, [prompt])[0]}'
