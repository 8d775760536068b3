"""Tests for beam search and encoder-decoder generation in flaxllm.generate: one beam is greedy,
decoder-only beam search returns what transformers' `generate(num_beams=...)` returns on the
same (random, locally built) LLaMA, encoder-decoder decoding with the KV cache equals decoding
without one, and bad settings fail with a ValueError before anything compiles.

References are independent of the code under test: transformers itself, the uncached
(decode=False) model recomputed over the whole prefix, and `reference_beam_search`, a plain
Python beam search written from the transformers algorithm (checked against transformers here).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import generate as G
from flaxllm import models

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from flaxllm.interop import hf  # noqa: E402

PROMPTS = [[5, 17, 42, 9, 3, 77], [11, 60], [64], [1, 2, 3, 4]]
SOURCES = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18], [20]]
STEPS = 8
BOS = 1
PAD = 0


def reference_beam_search(next_log_probs, num_beams, max_new_tokens, length_penalty,
                          stop_tokens):
  """Beam search over one input with Python lists, following transformers' `_beam_search`
  (do_sample=False, early_stopping=False). next_log_probs(prefixes) -> log-probs
  [len(prefixes), vocab] of the token after each generated prefix (a tuple of ids).
  Returns (best hypothesis as a list, its score)."""
  candidates_kept = max(2, 1 + len(stop_tokens)) * num_beams
  running = [((), 0.0)]                              # (generated ids, summed log-prob)
  finished = []                                      # (score, ids), best first
  for t in range(max_new_tokens):
    log_probs = next_log_probs([ids for ids, _ in running])
    candidates = sorted(((total + float(lp), ids + (tok,))
                         for (ids, total), row in zip(running, log_probs)
                         for tok, lp in enumerate(row)), key=lambda c: -c[0])[:candidates_kept]
    last_step = t + 1 == max_new_tokens
    stopped = [last_step or ids[-1] in stop_tokens for _, ids in candidates]
    finished += [(total / (t + 1) ** length_penalty, ids)     # stopped among the best N
                 for rank, ((total, ids), stop) in enumerate(zip(candidates, stopped))
                 if stop and rank < num_beams]
    finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
    running = [(ids, total) for (total, ids), stop in zip(candidates, stopped)
               if not stop][:num_beams]
    # Done at the last step, or once no running beam (scored at the current length) beats the
    # worst of N finished hypotheses: transformers then adds nothing more to this input.
    if last_step or (len(finished) == num_beams and
                     running[0][1] / (t + 1) ** length_penalty <= finished[-1][0]):
      break
  score, ids = finished[0]
  return list(ids), score


# ----------------------------------------------------------------------------- decoder-only

@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """A random LLaMA built in transformers (float32, eager attention), with weights large
  enough (initializer_range=0.5) for peaked next-token distributions, and its flaxllm import."""
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
      initializer_range=0.5)
  config._attn_implementation = 'eager'
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  path = str(tmp_path_factory.mktemp('llama'))
  model.save_pretrained(path, safe_serialization=True)
  cfg, params = hf.load(path)
  return dict(torch=model, path=path, cfg=cfg, params=params)


@pytest.fixture(scope='module')
def eos(llama):
  """A stop token that ends some beams: a token of the first prompt's greedy continuation."""
  return G.generate(llama['cfg'], llama['params'], PROMPTS, max_new_tokens=STEPS)[0][3]


_HF_RESULTS = {}


def hf_beam_search(model, num_beams, length_penalty, eos):
  """transformers' beam search of PROMPTS, left padded with an attention mask: (best
  continuation of each prompt, cut after its first EOS; sequences_scores). Memoised."""
  key = (num_beams, length_penalty, eos)
  if key in _HF_RESULTS:
    return _HF_RESULTS[key]
  width = max(map(len, PROMPTS))
  ids = torch.full((len(PROMPTS), width), PAD, dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(PROMPTS):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  with torch.no_grad():
    out = model.generate(ids, attention_mask=mask, num_beams=num_beams, do_sample=False,
                         length_penalty=length_penalty, early_stopping=False,
                         max_new_tokens=STEPS, eos_token_id=list(eos), pad_token_id=eos[0],
                         return_dict_in_generate=True, output_scores=True)
  rows = []
  for row in out.sequences[:, width:].tolist():
    ends = [i for i, tok in enumerate(row) if tok in eos]
    rows.append(row[:ends[0] + 1] if ends else row)
  _HF_RESULTS[key] = rows, out.sequences_scores.numpy()
  return _HF_RESULTS[key]


def test_one_beam_is_greedy(llama, eos):
  """One beam is greedy decoding, for rows that stop early and rows that never stop."""
  cfg, params = llama['cfg'], llama['params']
  greedy = G.generate(cfg, params, PROMPTS, max_new_tokens=STEPS, stop_tokens=(eos,))
  assert len(greedy[0]) < STEPS and any(len(row) == STEPS for row in greedy)
  assert G.beam_search(cfg, params, PROMPTS, num_beams=1, max_new_tokens=STEPS,
                       stop_tokens=(eos,), length_penalty=0.5) == greedy


def test_beam_search_matches_transformers(llama, eos):
  """Left padded batch of four prompts, 4 beams, an EOS that ends some beams, three length
  penalties: the same best sequences and scores as transformers."""
  cfg, params = llama['cfg'], llama['params']
  model = G.decode_model(cfg)
  tokens, mask = G.left_pad(PROMPTS, PAD, pad_to_multiple=8)
  results = {}
  for length_penalty in (1.0, 0.6, 2.0):
    expected, expected_scores = hf_beam_search(llama['torch'], 4, length_penalty, (eos,))
    out = G.beam_search_tokens(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                               length_penalty, num_beams=4, max_new_tokens=STEPS,
                               stop_tokens=(eos,), pad_id=PAD)
    got = [row[:n].tolist() for row, n in zip(np.asarray(out.tokens), np.asarray(out.lengths))]
    assert got == expected, length_penalty
    np.testing.assert_allclose(np.asarray(out.scores), expected_scores, rtol=1e-5, atol=1e-5)
    results[length_penalty] = got
  # Both kinds of final hypothesis occur (ended by EOS; cut at max_new_tokens), and the length
  # penalty changes the winner.
  assert any(row[-1] == eos and len(row) < STEPS for row in results[0.6])
  assert any(len(row) == STEPS and eos not in row for row in results[0.6])
  assert results[0.6] != results[1.0]


def test_beam_search_two_stop_tokens_matches_transformers(llama, eos):
  """Two stop tokens: transformers keeps (1 + 2) * num_beams candidates per step."""
  cfg, params = llama['cfg'], llama['params']
  stops = (eos, G.generate(cfg, params, PROMPTS, max_new_tokens=STEPS)[1][2])
  expected, _ = hf_beam_search(llama['torch'], 3, 0.6, stops)
  assert G.beam_search(cfg, params, PROMPTS, num_beams=3, max_new_tokens=STEPS,
                       length_penalty=0.6, stop_tokens=stops, pad_id=PAD) == expected
  assert any(row[-1] == stops[1] for row in expected)


def test_reference_beam_search_matches_transformers(llama, eos):
  """The Python reference used for the encoder-decoder below agrees with transformers too."""
  cfg, params = llama['cfg'], llama['params']
  full = models.build(cfg)
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(full.apply({'params': p}, t), axis=-1))
  expected, scores = hf_beam_search(llama['torch'], 4, 0.6, (eos,))
  for prompt, row, score in zip(PROMPTS, expected, scores):
    def next_log_probs(prefixes, prompt=prompt):
      seqs = np.zeros((4, 16), np.int32)            # fixed shape: one compilation
      for i, ids in enumerate(prefixes):
        seqs[i, :len(prompt) + len(ids)] = list(prompt) + list(ids)
      out = np.asarray(forward(params, jnp.asarray(seqs)))
      return [out[i, len(prompt) + len(ids) - 1] for i, ids in enumerate(prefixes)]
    ids, ref_score = reference_beam_search(next_log_probs, 4, STEPS, 0.6, (eos,))
    assert ids == row
    assert abs(ref_score - score) < 1e-4


def test_beam_search_scanned_layers(llama, eos):
  """With scan_layers the cache has a leading layers axis; beams are reordered along batch."""
  scfg, sparams = hf.load(llama['path'], scan_layers=True)
  expected, _ = hf_beam_search(llama['torch'], 4, 0.6, (eos,))
  assert G.beam_search(scfg, sparams, PROMPTS, num_beams=4, max_new_tokens=STEPS,
                       length_penalty=0.6, stop_tokens=(eos,)) == expected


def test_generate_main_beam_search(llama, eos, capsys):
  argv = ['--model', llama['path'], '--max-new-tokens', str(STEPS), '--num-beams', '4',
          '--length-penalty', '0.6', '--stop-ids', str(eos)]
  for p in PROMPTS:
    argv += ['--prompt-ids', ','.join(map(str, p))]
  G.generate_main(argv)
  lines = capsys.readouterr().out.strip().splitlines()
  expected, _ = hf_beam_search(llama['torch'], 4, 0.6, (eos,))
  assert [list(map(int, line.split(','))) for line in lines] == expected


# ----------------------------------------------------------------------------- encoder-decoder

@pytest.fixture(scope='module')
def transformer():
  """A tiny encoder-decoder whose random outputs are peaked and varied (large init; untied
  head and pre-norm, else it mostly repeats one token), its params and the uncached model's
  log-probs, jitted once for [rows, 16] sources and [rows, STEPS] targets."""
  cfg = models.presets.get('tiny_transformer', init_std=0.3, tie_embeddings=False,
                           norm_position='pre')
  full = models.build(cfg)
  params = models.init_params(full, jax.random.key(0))

  @jax.jit
  def log_probs(src, tgt):
    src_seg = (src != PAD).astype(jnp.int32)
    logits = full.apply({'params': params}, src, tgt, src_seg)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

  return cfg, params, log_probs


def uncached_next(log_probs, source, prefixes, rows=4, width=16):
  """Log-probs [len(prefixes), vocab] of the token after each target prefix, from the uncached
  model on [BOS] + prefix and the source (right padded to `width` with PAD, which the model
  masks by segment id); fixed shapes for one compilation."""
  src = np.full((rows, width), PAD, np.int32)
  src[:, :len(source)] = source
  tgt = np.zeros((rows, STEPS), np.int32)
  for i, ids in enumerate(prefixes):
    tgt[i, :1 + len(ids)] = [BOS] + list(ids)
  out = np.asarray(log_probs(jnp.asarray(src), jnp.asarray(tgt)))
  return [out[i, len(ids)] for i, ids in enumerate(prefixes)]


def test_seq2seq_greedy_matches_uncached_recompute(transformer):
  """Right padded sources, KV cache: the tokens and logits of recomputing the uncached model on
  each source alone and the whole target prefix at every step; one beam is the same."""
  cfg, params, log_probs = transformer
  src, mask = G.right_pad(SOURCES, PAD, pad_to_multiple=8)
  assert src.shape == (4, 16) and src[1, :3].tolist() == [8, 9, PAD]
  np.testing.assert_array_equal(mask.sum(-1), [len(x) for x in SOURCES])
  assert mask[:, 0].all()
  out = G.seq2seq_generate_tokens(G.decode_model(cfg), params, jnp.asarray(src),
                                  jnp.asarray(mask), max_new_tokens=STEPS, bos_id=BOS,
                                  return_logits=True)
  for i, source in enumerate(SOURCES):
    prefix = []
    for t in range(STEPS):
      ref = uncached_next(log_probs, source, [tuple(prefix)])[0]
      got = jax.nn.log_softmax(out.logits[i, t])
      np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
      prefix.append(int(np.argmax(ref)))
    assert np.asarray(out.tokens[i]).tolist() == prefix, f'row {i}'
  assert G.beam_search_seq2seq(cfg, params, SOURCES, num_beams=1, max_new_tokens=STEPS,
                               bos_id=BOS) == np.asarray(out.tokens).tolist()


def test_seq2seq_beam_search_matches_uncached_reference(transformer):
  """3 beams, a stop token from a greedy run, two length penalties: the same best targets as
  `reference_beam_search` over the uncached model (which differ from greedy here)."""
  cfg, params, log_probs = transformer
  greedy = G.generate_seq2seq(cfg, params, SOURCES, max_new_tokens=STEPS, bos_id=BOS)
  stop = (greedy[0][2],)
  results = {}
  for length_penalty in (1.0, 0.6):
    got = G.beam_search_seq2seq(cfg, params, SOURCES, num_beams=3, max_new_tokens=STEPS,
                                bos_id=BOS, length_penalty=length_penalty, stop_tokens=stop)
    for source, row in zip(SOURCES, got):
      expected, _ = reference_beam_search(
          lambda prefixes, source=source: uncached_next(log_probs, source, prefixes),
          3, STEPS, length_penalty, stop)
      assert row == expected, (source, length_penalty)
    results[length_penalty] = got
  assert any(row[-1] in stop for row in results[0.6])
  assert results[1.0] != results[0.6]
  assert any(row[:len(g)] != g for row, g in zip(results[1.0], greedy))


def test_generate_main_seq2seq(transformer, capsys, tmp_path):
  interop = pytest.importorskip('flaxllm.interop')
  cfg, params, _ = transformer
  interop.save_flaxllm(cfg, params, str(tmp_path / 'model'))
  stop = G.generate_seq2seq(cfg, params, SOURCES, max_new_tokens=STEPS, bos_id=BOS)[0][2]
  argv = ['--model', str(tmp_path / 'model'), '--max-new-tokens', str(STEPS), '--bos-id',
          str(BOS), '--num-beams', '3', '--length-penalty', '0.6', '--stop-ids', str(stop),
          '--json']
  for source in SOURCES:
    argv += ['--source-ids', ','.join(map(str, source))]
  G.generate_main(argv)
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [r['source_ids'] for r in records] == SOURCES
  assert [r['ids'] for r in records] == G.beam_search_seq2seq(
      cfg, params, SOURCES, num_beams=3, max_new_tokens=STEPS, bos_id=BOS, length_penalty=0.6,
      stop_tokens=(stop,))
  with pytest.raises(SystemExit):
    G.generate_main(['--model', str(tmp_path / 'model'), '--prompt-ids', '1,2'])
  assert '--source' in capsys.readouterr().err


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('num_beams, message', [
    (0, 'num_beams must be a positive integer'),
    (-2, 'num_beams must be a positive integer'),
    (2.5, 'num_beams must be a positive integer'),
    (257, r'num_beams=257 exceeds the vocabulary \(model.vocab_size=256\)'),
])
def test_bad_num_beams(num_beams, message):
  cfg = models.presets.get('tiny_llama')
  with pytest.raises(ValueError, match=message):       # raised before params are touched
    G.beam_search(cfg, None, [[1, 2]], num_beams=num_beams, max_new_tokens=4)
  tcfg = models.presets.get('tiny_transformer')
  if num_beams == 257:
    message = r'num_beams=257 exceeds the vocabulary \(model.vocab_size=32\)'
  with pytest.raises(ValueError, match=message):
    G.beam_search_seq2seq(tcfg, None, [[1, 2]], num_beams=num_beams, max_new_tokens=4, bos_id=1)


def test_bad_settings():
  cfg = models.presets.get('tiny_llama')
  tcfg = models.presets.get('tiny_transformer')
  with pytest.raises(ValueError, match='max_new_tokens must be >= 1'):
    G.beam_search(cfg, None, [[1, 2]], num_beams=2, max_new_tokens=0)
  with pytest.raises(ValueError, match=r'bos_id=32 is outside the vocabulary \[0, 32\)'):
    G.generate_seq2seq(tcfg, None, [[1, 2]], max_new_tokens=4, bos_id=32)
  with pytest.raises(ValueError, match='every source needs at least one token'):
    G.generate_seq2seq(tcfg, None, [[1, 2], []], max_new_tokens=4, bos_id=1)
  with pytest.raises(TypeError, match='use generate_seq2seq / beam_search_seq2seq'):
    G.generate(tcfg, None, [[1, 2]], max_new_tokens=4)
  with pytest.raises(TypeError, match='use generate / beam_search'):
    G.beam_search_seq2seq(cfg, None, [[1, 2]], num_beams=2, max_new_tokens=4, bos_id=1)
  with pytest.raises(ValueError, match='max_seq_len'):
    G.beam_search(models.presets.get('tiny_gpt2'), None, [[1] * 120], num_beams=2,
                  max_new_tokens=20)


def test_generate_main_rejects_beams_with_temperature(capsys):
  with pytest.raises(SystemExit):
    G.generate_main(['--model', 'x', '--prompt-ids', '1,2', '--num-beams', '2',
                     '--temperature', '0.7'])
  assert 'beam search does not sample' in capsys.readouterr().err
