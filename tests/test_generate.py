"""Tests for flaxllm.generate: KV-cache decoding against the uncached model, sampling filters
against hand-computed sets, stop tokens, seeds, and the CLI entry.

Every reference here is independent of the code under test: the full (decode=False) model
recomputed over the whole sequence, numpy sorts, or hand-computed nuclei.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import generate as G
from flaxllm import models

TOL = 1e-5
PROMPTS = [[5, 17, 42, 9, 3, 77, 120], [11, 200], [64], [1, 2, 3, 4]]
MODEL_CASES = {
    'tiny_llama': dict(),
    'tiny_gpt2': dict(),
    'tiny_llama_scan': dict(scan_layers=True),
}


@pytest.fixture(scope='module', params=list(MODEL_CASES))
def setup(request):
  name = request.param
  cfg = models.presets.get(name.replace('_scan', ''), **MODEL_CASES[name])
  full = models.build(cfg)
  params = models.init_params(full, jax.random.key(1))
  return cfg, full, params


@pytest.fixture(scope='module')
def llama():
  cfg = models.presets.get('tiny_llama')
  full = models.build(cfg)
  return cfg, full, models.init_params(full, jax.random.key(3))


_JITTED_APPLY = {}


def uncached_logits(full, params, tokens):
  """Logits [batch, seq, vocab] of the uncached (decode=False) model, jitted per module."""
  if full not in _JITTED_APPLY:
    _JITTED_APPLY[full] = jax.jit(lambda p, t: full.apply({'params': p}, t))
  return np.asarray(_JITTED_APPLY[full](params, jnp.asarray(tokens, jnp.int32)))


def reference_greedy(full, params, prompt, steps, buffer=32):
  """Greedy decoding of one prompt by recomputing the uncached model over the whole sequence at
  every step (no cache). The sequence sits at the start of a fixed buffer so one compilation
  serves every step; the causal model never lets the trailing filler reach earlier positions.
  Returns (tokens [steps], logits [steps, vocab])."""
  seq = np.zeros((1, buffer), np.int32)
  seq[0, :len(prompt)] = prompt
  toks, logits = [], []
  for t in range(steps):
    n = len(prompt) + t
    lg = uncached_logits(full, params, seq)[0, n - 1]
    toks.append(int(np.argmax(lg)))
    logits.append(lg)
    seq[0, n] = toks[-1]
  return toks, np.stack(logits)


# ----------------------------------------------------------------------------- KV cache

def test_cached_greedy_matches_uncached_recompute(setup):
  """Left-padded batch of different-length prompts, KV cache: same tokens and logits as each
  prompt alone, unpadded, recomputed without a cache at every step."""
  cfg, full, params = setup
  steps = 6
  tokens, mask = G.left_pad(PROMPTS, pad_id=0, pad_to_multiple=8)
  assert tokens.shape == (4, 8)
  out = G.generate_tokens(G.decode_model(cfg), params, jnp.asarray(tokens), jnp.asarray(mask),
                          jax.random.key(0), max_new_tokens=steps, return_logits=True)
  assert out.logits.shape == (4, steps, cfg.vocab_size)
  np.testing.assert_array_equal(np.asarray(out.lengths), steps)
  for i, prompt in enumerate(PROMPTS):
    ref_tokens, ref_logits = reference_greedy(full, params, prompt, steps)
    assert np.asarray(out.tokens[i]).tolist() == ref_tokens, f'row {i}'
    np.testing.assert_allclose(np.asarray(out.logits[i]), ref_logits, atol=TOL, rtol=0)
    # Also against the prompt alone, unpadded: one uncached forward over prompt + generated
    # tokens gives the logits of every step (causality), and each token is their argmax.
    seq = prompt + ref_tokens
    alone = uncached_logits(full, params, [seq])[0, len(prompt) - 1:len(seq) - 1]
    np.testing.assert_allclose(np.asarray(out.logits[i]), alone, atol=TOL, rtol=0)
    np.testing.assert_array_equal(np.argmax(alone, -1), ref_tokens)


def test_incremental_single_token_forward_matches_full(setup):
  """Feeding a sequence one token at a time through the cache reproduces the full forward's
  logits at every position (also for a 3-token chunk followed by single tokens)."""
  cfg, full, params = setup
  seq = jnp.asarray([[7, 3, 99, 250, 1, 0, 42, 18, 5, 64],
                     [9, 9, 9, 100, 101, 102, 2, 3, 4, 200]], jnp.int32)
  batch, n = seq.shape
  ref = uncached_logits(full, params, seq)
  dec = G.decode_model(cfg)

  @jax.jit
  def step(cache, tok, pos):
    seg = jnp.ones_like(tok)
    logits, mutated = dec.apply({'params': params, 'cache': cache}, tok, pos, seg,
                                mutable=['cache'])
    return logits, mutated['cache']

  cache = G.init_cache(dec, batch, n)
  for t in range(n):
    pos = jnp.full((batch, 1), t, jnp.int32)
    logits, cache = step(cache, seq[:, t:t + 1], pos)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), ref[:, t], atol=TOL, rtol=0)
  flat = jax.tree_util.tree_flatten_with_path(cache)[0]
  index = [np.asarray(x) for path, x in flat if 'index' in jax.tree_util.keystr(path)]
  assert index and all((i == n).all() for i in index)

  cache = G.init_cache(dec, batch, n)
  pos = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (batch, 3))
  logits, cache = step(cache, seq[:, :3], pos)
  np.testing.assert_allclose(np.asarray(logits), ref[:, :3], atol=TOL, rtol=0)
  for t in range(3, n):
    logits, cache = step(cache, seq[:, t:t + 1], jnp.full((batch, 1), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), ref[:, t], atol=TOL, rtol=0)


def test_init_cache_shapes():
  cfg = models.presets.get('tiny_llama')
  cache = G.init_cache(cfg, 3, 20)
  leaf = cache['decoder']['layers_0']['attn']
  assert leaf['key'].shape == (3, cfg.kv_heads, 20, cfg.dim_per_head)   # heads-major
  assert leaf['value'].shape == (3, cfg.kv_heads, 20, cfg.dim_per_head)
  assert leaf['segment_ids'].shape == (3, 20) and int(leaf['index']) == 0
  scanned = G.init_cache(cfg.replace(scan_layers=True), 3, 20)['decoder']['layers']['attn']
  assert scanned['key'].shape == (cfg.num_layers, 3, cfg.kv_heads, 20, cfg.dim_per_head)
  assert scanned['index'].shape == (cfg.num_layers,)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(cache))


def test_left_pad_and_positions():
  tokens, mask = G.left_pad([[4, 5, 6], [7]], pad_id=9, pad_to_multiple=4)
  np.testing.assert_array_equal(tokens, [[9, 4, 5, 6], [9, 9, 9, 7]])
  np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
  pos, seg = G.prompt_positions(mask)
  np.testing.assert_array_equal(pos, [[0, 0, 1, 2], [0, 0, 0, 0]])
  np.testing.assert_array_equal(seg, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match='at least one token'):
    G.left_pad([[1], []])


# ----------------------------------------------------------------------------- sampling

def _kept(filtered):
  return set(np.flatnonzero(np.isfinite(np.asarray(filtered))).tolist())


def test_top_k_keeps_only_the_k_best():
  logits = jax.random.normal(jax.random.key(0), (3, 50))
  for k in (1, 5, 17):
    filtered = G.filter_logits(logits, 1.0, top_k=k)
    for row in range(3):
      best = set(np.argsort(-np.asarray(logits[row]))[:k].tolist())
      assert _kept(filtered[row]) == best
      kept = sorted(best)
      np.testing.assert_array_equal(np.asarray(filtered[row])[kept], np.asarray(logits[row])[kept])
  # Sampling: over many draws only the top-k appear (and all of them do, for flat logits).
  row = jnp.asarray(np.linspace(0.0, 1.0, 20), jnp.float32)
  keys = jax.random.split(jax.random.key(1), 4000)
  draws = jax.vmap(lambda key: G.sample_logits(row, key, 1.0, top_k=4))(keys)
  assert set(np.asarray(draws).tolist()) == {16, 17, 18, 19}


def test_top_p_keeps_the_minimal_nucleus():
  probs = np.array([0.1, 0.5, 0.15, 0.25])          # sorted: 1 (0.5), 3 (0.25), 2 (0.15), 0
  logits = jnp.asarray(np.log(probs), jnp.float32)
  # Mass of strictly-better tokens < p  <=>  token in the minimal nucleus.
  cases = {0.3: {1}, 0.5: {1}, 0.6: {1, 3}, 0.7: {1, 3}, 0.76: {1, 3, 2}, 0.85: {1, 3, 2},
           0.95: {0, 1, 2, 3}, 1.0: {0, 1, 2, 3}}
  for p, expected in cases.items():
    assert _kept(G.filter_logits(logits, 1.0, top_p=p)) == expected, p
  # top-k applies before top-p: with k=2 the distribution renormalises to {1: 2/3, 3: 1/3}.
  assert _kept(G.filter_logits(logits, 1.0, top_k=2, top_p=0.6)) == {1}
  assert _kept(G.filter_logits(logits, 1.0, top_k=2, top_p=0.7)) == {1, 3}
  # Sampling from the nucleus {1, 3} follows the renormalised probabilities 2/3, 1/3.
  keys = jax.random.split(jax.random.key(2), 6000)
  draws = np.asarray(jax.vmap(lambda key: G.sample_logits(logits, key, 1.0, top_p=0.7))(keys))
  assert set(draws.tolist()) == {1, 3}
  assert abs((draws == 1).mean() - 2 / 3) < 0.03


def test_temperature():
  logits = jax.random.normal(jax.random.key(4), (6, 40)) * 3
  argmax = np.argmax(np.asarray(logits), axis=-1)
  np.testing.assert_array_equal(G.sample_logits(logits, jax.random.key(0), 0.0), argmax)
  np.testing.assert_array_equal(G.sample_logits(logits, jax.random.key(0), 0.0, top_k=3,
                                                top_p=0.5), argmax)
  # Temperature divides the logits; frequencies follow softmax(logits / T).
  row = jnp.asarray([0.0, 1.0, 2.0], jnp.float32)
  keys = jax.random.split(jax.random.key(5), 8000)
  for temp in (0.5, 2.0):
    draws = np.asarray(jax.vmap(lambda key: G.sample_logits(row, key, temp))(keys))
    expected = np.exp(np.array([0.0, 1.0, 2.0]) / temp)
    expected /= expected.sum()
    freq = np.bincount(draws, minlength=3) / len(draws)
    np.testing.assert_allclose(freq, expected, atol=0.025)


def test_generate_temperature_zero_and_top_k_one_are_greedy(llama):
  cfg, full, params = llama
  greedy = [reference_greedy(full, params, p, 5)[0] for p in PROMPTS]
  assert G.generate(cfg, params, PROMPTS, max_new_tokens=5, temperature=0.0, seed=3) == greedy
  assert G.generate(cfg, params, PROMPTS, max_new_tokens=5, temperature=1.3, top_k=1,
                    seed=7) == greedy


def test_seeds(llama):
  cfg, _, params = llama
  kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.95)
  a = G.generate(cfg, params, PROMPTS, seed=0, **kw)
  b = G.generate(cfg, params, PROMPTS, seed=0, **kw)
  c = G.generate(cfg, params, PROMPTS, seed=1, **kw)
  assert a == b
  assert a != c
  assert all(len(row) == 12 for row in a + c)
  assert all(0 <= t < cfg.vocab_size for row in a + c for t in row)


def test_stop_tokens(llama):
  cfg, full, params = llama
  steps = 8
  refs = [reference_greedy(full, params, p, steps)[0] for p in PROMPTS]
  stop = refs[0][2]                                  # row 0 stops at its third token
  expected = [ref[:ref.index(stop) + 1] if stop in ref else ref for ref in refs]
  pad = 255
  assert G.generate(cfg, params, PROMPTS, max_new_tokens=steps, stop_tokens={stop}, pad_id=pad,
                    pad_to_multiple=1) == expected

  # Raw arrays: finished rows emit pad after the stop token; lengths exclude the padding.
  tokens, mask = G.left_pad(PROMPTS, pad_id=pad)
  out = G.generate_tokens(G.decode_model(cfg), params, jnp.asarray(tokens), jnp.asarray(mask),
                          max_new_tokens=steps, stop_tokens=(stop,), pad_id=pad)
  for i, exp in enumerate(expected):
    assert int(out.lengths[i]) == len(exp)
    row = np.asarray(out.tokens[i]).tolist()
    assert row == exp + [pad] * (steps - len(exp))

  # Every row stops -> the loop exits early: no logits were computed after the last stop.
  stops = tuple({ref[1] for ref in refs})
  out = G.generate_tokens(G.decode_model(cfg), params, jnp.asarray(tokens), jnp.asarray(mask),
                          max_new_tokens=steps, stop_tokens=stops, return_logits=True)
  lengths = np.asarray(out.lengths)
  assert lengths.max() <= 2
  assert np.all(np.asarray(out.logits)[:, lengths.max():] == 0)
  assert np.all(np.asarray(out.logits)[:, :lengths.max()] != 0)


# ----------------------------------------------------------------------------- CLI

def test_generate_main_hf_directory_prompt_ids(llama, capsys, tmp_path):
  """The CLI on a Hugging Face directory written by flaxllm.interop.hf.save."""
  interop = pytest.importorskip('flaxllm.interop')
  cfg, full, params = llama
  interop.hf.save(cfg, params, str(tmp_path / 'hf'))
  G.generate_main(['--model', str(tmp_path / 'hf'), '--prompt-ids', '5,17,42',
                   '--prompt-ids', '11 200', '--max-new-tokens', '4'])
  lines = capsys.readouterr().out.strip().splitlines()
  expected = [reference_greedy(full, params, p, 4)[0] for p in ([5, 17, 42], [11, 200])]
  assert [list(map(int, line.split(','))) for line in lines] == expected


def test_generate_main_flaxllm_directory_sentencepiece(llama, capsys, tmp_path):
  """The CLI on a flaxllm directory (save_flaxllm) with a sentencepiece tokenizer."""
  interop = pytest.importorskip('flaxllm.interop')
  spm = pytest.importorskip('sentencepiece')
  text = ['the quick brown fox jumps over the lazy dog', 'a stitch in time saves nine',
          'all that glitters is not gold', 'the early bird catches the worm'] * 20
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / 'sp'),
                                 vocab_size=60, model_type='bpe', minloglevel=2)
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / 'sp.model'))
  cfg, full, params = llama
  interop.save_flaxllm(cfg, params, str(tmp_path / 'model'))
  G.generate_main([f'--model={tmp_path / "model"}', '--tokenizer', str(tmp_path / 'sp.model'),
                   '--prompt', 'the quick fox', '--max-new-tokens', '3', '--json',
                   '--ignore-eos'])
  record = json.loads(capsys.readouterr().out.strip())
  prompt = [sp.bos_id()] + sp.encode('the quick fox')
  assert record['prompt_ids'] == prompt
  assert record['ids'] == reference_greedy(full, params, prompt, 3)[0]
  assert record['text'] == sp.decode(record['ids'])


def test_generate_main_needs_a_prompt(llama, capsys, tmp_path):
  from flaxllm.interop import native
  cfg, _, params = llama
  native.save_flaxllm(cfg, params, str(tmp_path / 'model'))   # a model dir without tokenizer
  with pytest.raises(SystemExit):
    G.generate_main(['--model', str(tmp_path / 'model'), '--prompt', 'hello'])
  assert '--tokenizer' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    G.generate_main(['--model', str(tmp_path / 'nothing'), '--prompt-ids', '1,2'])
  assert f"--model='{tmp_path / 'nothing'}' does not exist" in capsys.readouterr().err


def test_learned_positions_bound():
  cfg = models.presets.get('tiny_gpt2')
  with pytest.raises(ValueError, match='max_seq_len'):   # checked before params are used
    G.generate(cfg, None, [[1] * 120], max_new_tokens=20)
