"""The lm-evaluation-harness backend `flaxllm` (flaxllm/evaluation/harness.py): log-likelihoods
against a direct forward pass, rolling windows, generation against flaxllm.generate, and parity
with lm-eval's own `hf` backend on the same Hugging Face directory (a random-init tiny LLaMA
with a byte-level tokenizer.json, built here; nothing is downloaded)."""
from __future__ import annotations

import functools
import json
import logging

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
lm_eval = pytest.importorskip('lm_eval')

from lm_eval.api.instance import Instance  # noqa: E402

from flaxllm import generate as G  # noqa: E402
from flaxllm import models as M  # noqa: E402
from flaxllm import rundir  # noqa: E402
from flaxllm.evaluation import harness  # noqa: E402
from flaxllm.interop import hf, native  # noqa: E402

MAX_LEN = 48       # short, so rolling windows and left truncation happen on short texts
TOL = 1e-4
TEXT = 'def add(a, b):\n    return a + b\n\nprint(add(1, 2))  # three, of course\n' * 2


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf_llama')
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=264, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_LEN,
      rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
  with torch.no_grad():   # large random weights: peaked, varied next-token distributions
    for name, p in model.named_parameters():
      if not name.endswith('norm.weight'):
        p.copy_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  hf.byte_level_tokenizer().save_pretrained(path)
  return str(path)


@pytest.fixture(scope='module')
def lm(hf_dir):
  return harness.FlaxLM(pretrained=hf_dir, batch_size=4)


@pytest.fixture(scope='module')
def hf_lm(hf_dir):
  from lm_eval.models.huggingface import HFLM
  return HFLM(pretrained=hf_dir, device='cpu', dtype='float32', batch_size=4)


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _ll(lm, pairs):
  return lm.loglikelihood([_req('loglikelihood', c, x) for c, x in pairs], disable_tqdm=True)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, params, tokens):
  return model.apply({'params': params}, tokens)


def _direct_logp(lm, ids):
  """log p(ids[i] | ids[:i]) for i >= 1 and the argmax after each position, from one plain
  forward pass of the whole sequence (right padded to MAX_LEN: one compilation; causal, so the
  padding changes nothing before it)."""
  n = len(ids) - 1
  tokens = np.zeros((1, MAX_LEN), np.int32)
  tokens[0, :n] = ids[:-1]
  logits = np.asarray(_forward(lm.model, lm.params, tokens)[0, :n], np.float64)
  logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
  return logp[np.arange(n), ids[1:]], logits.argmax(-1)


def test_loglikelihood_is_the_sum_of_log_softmax(lm):
  context, continuation = 'def add(a, b):\n    return', ' a + b'
  (logprob, greedy), = _ll(lm, [(context, continuation)])
  ids = lm.tok_encode(context + continuation)
  n = len(lm.tok_encode(continuation, add_special_tokens=False))
  logp, argmax = _direct_logp(lm, ids)
  assert logprob == pytest.approx(logp[-n:].sum(), abs=TOL)
  assert greedy == bool((argmax[-n:] == np.asarray(ids[-n:])).all())
  assert logprob < 0


def test_additivity(lm):
  # (no trailing space in c + a: lm-eval moves such a space into the continuation)
  c, a, b = 'print(add(', '1,', ' 2))'
  (ab, _), (first, _), (second, _) = _ll(lm, [(c, a + b), (c, a), (c + a, b)])
  assert ab == pytest.approx(first + second, abs=TOL)


def test_empty_context_is_conditioned_on_the_prefix_token(lm):
  (logprob, _), = _ll(lm, [('', 'abc')])
  logp, _ = _direct_logp(lm, [lm.prefix_token_id] + lm.tok_encode('abc'))
  assert logprob == pytest.approx(logp.sum(), abs=TOL)


def test_greedy_flag(lm):
  """A continuation of argmax tokens is greedy; changing its last token makes it not. (Random
  weights often prefer bytes that are not text on their own: take the first context whose two
  greedy tokens are printable ASCII.)"""
  for context in ('x = ', 'def f', 'print(', 'a + b', 'return ', 'if x', '# ', 'import '):
    ids = lm.tok_encode(context)
    greedy_ids = []
    for _ in range(2):
      _, argmax = _direct_logp(lm, ids + greedy_ids + [0])
      greedy_ids.append(int(argmax[-1]))
    text = lm.tok_decode(greedy_ids)
    if text.isascii() and text.isprintable() and len(text) == 2:
      break
  else:
    pytest.fail('no context with a printable greedy continuation')
  assert lm.tok_encode(text, add_special_tokens=False) == greedy_ids
  other = text[0] + ('a' if text[1] != 'a' else 'b')
  (_, is_greedy), (_, not_greedy), (_, first) = _ll(lm, [(context, text), (context, other),
                                                        (context, text[0])])
  assert is_greedy and first and not not_greedy


def test_rolling_loglikelihood_equals_the_direct_token_loss(lm):
  short = 'print(add(1, 2))'    # one window: minus the mean token NLL times the token count
  ids = [lm.prefix_token_id] + lm.tok_encode(short)
  logp, _ = _direct_logp(lm, ids)
  nll_mean, count = -logp.mean(), len(ids) - 1
  total, = lm.loglikelihood_rolling([_req('loglikelihood_rolling', short)], disable_tqdm=True)
  assert total == pytest.approx(-nll_mean * count, abs=TOL)


def test_rolling_windows_of_a_long_text(lm):
  """A text of several windows: the sum over lm-eval's disjoint windows, each scored by a direct
  forward pass of its own (context, continuation) window."""
  ids = lm.tok_encode(TEXT)
  assert len(ids) > 2 * MAX_LEN
  expected = 0.0
  for context, continuation in map(lm_eval.utils.make_disjoint_window,
                                   lm_eval.utils.get_rolling_token_windows(
                                       ids, lm.prefix_token_id, MAX_LEN, 1)):
    logp, _ = _direct_logp(lm, context + continuation)
    expected += logp[-len(continuation):].sum()
  total, = lm.loglikelihood_rolling([_req('loglikelihood_rolling', TEXT)], disable_tqdm=True)
  assert total == pytest.approx(expected, abs=1e-3)


def test_long_contexts_are_cut_from_the_left_and_logged_once(lm, caplog):
  lm._truncation_logged = False
  long_context = TEXT * 2 + '#'    # no trailing whitespace: the continuation stays ' end'
  with caplog.at_level(logging.WARNING, logger=harness.__name__):
    (cut, _), (cut_again, _) = _ll(lm, [(long_context, ' end'), (long_context + 'x', ' end')])
  assert sum('cut from the left' in r.getMessage() for r in caplog.records) == 1
  ids = lm.tok_encode(long_context + ' end')[-(MAX_LEN + 1):]
  logp, _ = _direct_logp(lm, ids)
  assert cut == pytest.approx(logp[-4:].sum(), abs=TOL)
  assert np.isfinite(cut_again)


def _generate(lm, context, **gen_kwargs):
  out, = lm.generate_until([_req('generate_until', context, gen_kwargs)], disable_tqdm=True)
  return out


def test_greedy_generation_equals_flaxllm_generate(lm):
  context = 'def add(a, b):'
  out = _generate(lm, context, until=[], max_gen_toks=12, do_sample=False)
  expected, = G.generate(lm.model_cfg, lm.params, [lm.tok_encode(context)], max_new_tokens=12,
                         stop_tokens=(lm.eot_token_id,))
  assert out == lm.tok_decode(expected)
  assert len(out.encode()) > 0


def test_generation_stops_at_each_stop_string(lm):
  context = 'def add(a, b):'
  full = _generate(lm, context, until=[], max_gen_toks=12, do_sample=False)
  assert len(full) >= 4
  for k in (1, 2, len(full) // 2):
    stop = full[k:k + 2]          # a stop string inside the greedy output ...
    out = _generate(lm, context, until=[stop], max_gen_toks=12, do_sample=False)
    assert out == full[:full.index(stop)]   # ... ends it, and is never returned
    assert stop not in out
  single = full[1]                # a stop string of one token ends decoding early
  assert _generate(lm, context, until=[single], max_gen_toks=12) == full[:full.index(single)]


def test_sampling_runs_and_respects_max_gen_toks(lm):
  out = _generate(lm, 'x', until=[], max_gen_toks=5, do_sample=True, temperature=1.5)
  assert len(out) <= 5     # each character comes from at least one byte token


REQUESTS = [('def add(a, b):\n    return', ' a + b'), ('print(add(', '1, 2))'),
            ('', 'hello'), ('x = ', 'y'), (TEXT, ' # the end'), ('a', 'b' * 40)]


def test_loglikelihoods_match_the_hf_backend(lm, hf_lm):
  mine = _ll(lm, REQUESTS)
  theirs = _ll(hf_lm, REQUESTS)
  for (a, ga), (b, gb) in zip(mine, theirs):
    assert a == pytest.approx(b, abs=TOL)
    assert ga == gb
  rolling = [_req('loglikelihood_rolling', t) for t in ('short text', TEXT)]
  for a, b in zip(lm.loglikelihood_rolling(rolling, disable_tqdm=True),
                  hf_lm.loglikelihood_rolling(rolling, disable_tqdm=True)):
    assert a == pytest.approx(b, abs=1e-3)


def test_greedy_generation_matches_the_hf_backend(lm, hf_lm):
  reqs = [_req('generate_until', c, dict(until=['\n\n', '))'], max_gen_toks=10, do_sample=False))
          for c in ('def add(a, b):', 'print(', 'x')]
  assert lm.generate_until(reqs, disable_tqdm=True) == hf_lm.generate_until(reqs,
                                                                            disable_tqdm=True)


def _write_task(tmp_path):
  rows = [dict(question=f'{a} + {b} =', choices=[str(a + b), str(a + b + 1), str(a * b + 7)],
               label=i % 3) for i, (a, b) in enumerate([(1, 2), (3, 4), (5, 6), (2, 2), (7, 1),
                                                        (4, 4)])]
  data = tmp_path / 'sums.jsonl'
  data.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  (tmp_path / 'tiny_sums.yaml').write_text(
      'task: tiny_sums\n'
      'dataset_path: json\n'
      f'dataset_kwargs:\n  data_files: {data}\n'
      'test_split: train\n'
      'output_type: multiple_choice\n'
      'doc_to_text: "{{question}}"\n'
      'doc_to_choice: "{{choices}}"\n'
      'doc_to_target: label\n'
      'target_delimiter: " "\n'
      'metric_list:\n  - metric: acc\n')
  from lm_eval.tasks import TaskManager
  return TaskManager(include_path=str(tmp_path), include_defaults=False)


def task_scores(model, tasks) -> tuple[float, list]:
  """(accuracy, per-document choice log-likelihoods) of `model` on the local task."""
  out = lm_eval.simple_evaluate(model=model, tasks=['tiny_sums'], task_manager=tasks,
                                log_samples=True, verbosity='ERROR')
  samples = out['samples']['tiny_sums']
  return (out['results']['tiny_sums']['acc,none'],
          [[r[0] for r in s['filtered_resps']] for s in samples])


def test_same_accuracy_as_the_hf_backend_on_a_local_task(lm, hf_lm, tmp_path):
  tasks = _write_task(tmp_path)
  (acc, lls), (hf_acc, hf_lls) = task_scores(lm, tasks), task_scores(hf_lm, tasks)
  assert acc == hf_acc
  np.testing.assert_allclose(np.asarray(lls, float), np.asarray(hf_lls, float), atol=TOL)


def test_registered_as_flaxllm(hf_dir):
  from lm_eval.api.registry import get_model
  assert get_model('flaxllm') is harness.FlaxLM


def test_a_missing_model_dir_is_one_sentence(tmp_path):
  with pytest.raises(rundir.RunDirError, match=r"pretrained='.*none' does not exist") as e:
    harness.FlaxLM(pretrained=str(tmp_path / 'none'))
  assert str(e.value).count('. ') == 0 and str(e.value).endswith('.')


def test_a_tokenizer_larger_than_the_model_vocabulary(tmp_path):
  """A model directory whose bytes tokenizer (259 tokens) does not fit its vocabulary (256):
  refused before any array is read."""
  path = tmp_path / 'model'
  path.mkdir()
  (path / native.CONFIG_NAME).write_text(json.dumps(M.presets.get('tiny_llama').to_dict()))
  (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  with pytest.raises(rundir.RunDirError, match="has 259 tokens but the model's vocab_size is "
                                               '256') as e:
    harness.FlaxLM(pretrained=str(path))
  assert str(e.value).count('. ') == 0 and str(e.value).endswith('.')


def test_a_flaxllm_model_dir_with_the_bytes_tokenizer(tmp_path):
  """flaxllm's own layout and tokenizer: contexts start with BOS (as every training document),
  an empty context and rolling windows use BOS as the prefix token."""
  cfg = M.presets.get('tiny_llama').replace(vocab_size=264, max_seq_len=MAX_LEN)
  params = M.init_params(M.build(cfg), jax.random.key(1))
  path = tmp_path / 'model'
  native.save_flaxllm(cfg, params, str(path))
  (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  lm = harness.FlaxLM(pretrained=str(path), batch_size=2)
  tok = harness.tokenizer_lib.ByteTokenizer()
  (logprob, _), (empty, _) = _ll(lm, [('ab', 'cd'), ('', 'cd')])
  logp, _ = _direct_logp(lm, [tok.bos_id] + tok.encode('abcd'))
  assert logprob == pytest.approx(logp[-2:].sum(), abs=TOL)
  total, = lm.loglikelihood_rolling([_req('loglikelihood_rolling', 'abcd')], disable_tqdm=True)
  assert total == pytest.approx(logp.sum(), abs=TOL)    # one BOS, then every byte scored
  logp, _ = _direct_logp(lm, [tok.bos_id] + tok.encode('cd'))
  assert empty == pytest.approx(logp.sum(), abs=TOL)


def test_sharded_over_a_mesh_gives_the_same_numbers(hf_dir, lm):
  """mesh='data:2/fsdp:2/tensor:2' (as lm-eval's model_args write it) over the 8 test devices:
  params restored into shards, rows split over the data axes; the same log-likelihoods,
  rolling totals and greedy text as the one-device backend."""
  sharded = harness.FlaxLM(pretrained=hf_dir, batch_size=4, mesh='data:2/fsdp:2/tensor:2')
  leaves = jax.tree.leaves(sharded.params)
  assert all(len(x.sharding.device_set) == 8 for x in leaves)
  assert sum(not x.sharding.is_fully_replicated for x in leaves) >= len(leaves) // 2
  pairs = [('def add(a, b):\n    return', ' a + b'), ('', 'abc'), (TEXT[:60], TEXT[60:90])]
  np.testing.assert_allclose([x for x, _ in _ll(sharded, pairs)],
                             [x for x, _ in _ll(lm, pairs)], atol=1e-5)
  rolling = [_req('loglikelihood_rolling', TEXT)]
  assert sharded.loglikelihood_rolling(rolling, disable_tqdm=True)[0] == pytest.approx(
      lm.loglikelihood_rolling(rolling, disable_tqdm=True)[0], abs=1e-4)
  until = [_req('generate_until', 'def f(', {'until': ['\n'], 'max_gen_toks': 8,
                                              'do_sample': False})]
  assert sharded.generate_until(until, disable_tqdm=True) == lm.generate_until(
      until, disable_tqdm=True)


@pytest.mark.parametrize('mesh, batch_size, message', [
    ('fsdp=4', 4, r"mesh 'fsdp=4': 'fsdp=4' is not AXIS:SIZE .* write e\.g\. fsdp:4,tensor:2\."),
    ('data:2/fsdp:4', 3, r'the global batch size 3 is not divisible by the data-parallel mesh '
                         r'axes data=2 x fsdp=4 = 8; use a multiple of 8\.')])
def test_a_bad_mesh_is_one_sentence(hf_dir, mesh, batch_size, message):
  with pytest.raises(ValueError, match=message):
    harness.FlaxLM(pretrained=hf_dir, batch_size=batch_size, mesh=mesh)


def test_packing_puts_every_request_in_one_row_within_the_width():
  lengths = [5, 16, 3, 9, 9, 1, 12, 4, 16, 7]
  rows = harness.pack(lengths, 16)
  assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
  assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
  assert len(rows) == -(-sum(lengths) // 16)    # best fit reaches the bound here: no row wasted
