"""Preference objectives through the trainer (flaxllm.objectives.align): reward models and DPO
on a tiny LLaMA with byte tokens and generated pairs whose preference is a rule in code (a
response that parses as Python is better). The losses themselves are checked against TRL in
tests/test_align_losses.py; here: the sequences they are computed from, the reference model's
three modes, training on the mesh, the exports, and bad input in one sentence."""
import ast
import json
import os
import random

import jax
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import models, parallel
from flaxllm.data.tokenizer import ByteTokenizer
from flaxllm.interop import native
from flaxllm.models.config import ConfigError
from flaxllm.objectives.align import reward, sequences
from flaxllm.train import reward_cmd, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'
WORDS = ['x', 'y', 'total', 'count', 'name', 'value', 'f', 'g']


def _pairs(n: int, seed: int = 0):
  """Records whose chosen response parses as Python and whose rejected one does not."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.sample(WORDS, 2)
    good = f'{a} = {b} + {rng.randint(1, 9)}'
    bad = good.replace('=', rng.choice(['= =', '(', '= +)']), 1)
    assert ast.parse(good) and bad != good
    out.append({'prompt': f'# set {a}\n', 'chosen': good, 'rejected': bad})
  return out


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('pairs') / 'pairs.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in _pairs(400)))
  return str(path)


def _config(pairs_file, objective, *overrides, steps=20):
  return config_lib.load_config(TINY, [
      f'--config.objective={objective}', '--config.data.source=jsonl',
      f'--config.data.path={pairs_file}', '--config.data.val_fraction=0.1',
      f'--config.total_steps={steps}', '--config.seq_len=48', '--config.batch_size=8',
      '--config.eval_every=0', f'--config.ckpt_every={steps}', '--config.eval_batches=2',
      '--config.log_every=1', '--config.peak_flops=1e11', '--config.wandb.mode=disabled',
      '--config.schedule.warmup_steps=2', '--config.optim.lr=3e-3', *overrides])


def _rows(cfg, seed=0, batch=3, seq=10):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  mask = np.zeros((batch, seq), np.float32)
  mask[:, 4:8] = 1
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
          'positions': np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
          'segment_ids': np.ones((batch, seq), np.int32)}


def test_token_logps_equal_the_full_forward_in_chunks_or_not():
  cfg = models.presets.get('tiny_llama')
  params = models.init_params(models.build(cfg), jax.random.key(0))
  rows = _rows(cfg)
  logits = models.build(cfg).apply({'params': params}, rows['inputs'])
  want = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), rows['targets'][..., None],
                            -1)[..., 0] * rows['loss_mask']
  for chunk in (0, 3, 16):
    got = sequences.token_logps(cfg, params, rows, chunk_size=chunk)
    np.testing.assert_allclose(got, want, atol=1e-5)
  hidden = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
  last = sequences.last_hidden(hidden, np.array([[1, 1, 0, 0], [1, 1, 1, 1]]))
  np.testing.assert_array_equal(last, hidden[[0, 1], [1, 3]])


def _programs(config, devices=1):
  return trainer.build_programs(config, parallel.make_mesh(config.mesh,
                                                           jax.devices()[:devices]))


def _batch(config, programs):
  tokenizer = ByteTokenizer()   # the tiny config's
  it = programs.objective.data_iterator(tokenizer, 'train', seq_len=config.seq_len,
                                        batch_size=config.batch_size, seed=0)
  batch = next(it)
  it.close()
  return batch


def test_dpo_with_the_policy_as_reference_is_log_2_and_leaves_the_reference_unchanged(
    pairs_file):
  config = _config(pairs_file, 'dpo')
  programs = _programs(config)
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  assert set(frozen) == {'reference'}           # full fine-tuning: a frozen copy of the start
  before = jax.tree.map(np.array, frozen['reference'])
  state = programs.init(trainable, key)
  batch = parallel.shard_batch(_batch(config, programs), programs.mesh, programs.rules)
  losses_seen = []
  for _ in range(4):
    state, metrics = programs.train_step(state, batch, frozen)
    losses_seen.append(float(metrics['loss']))
    if len(losses_seen) == 1:     # step 0: policy == reference
      np.testing.assert_allclose(metrics['loss'], np.log(2.0), rtol=1e-6)
      np.testing.assert_allclose(metrics['margin'], 0.0, atol=1e-6)
  assert losses_seen[-1] < losses_seen[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen['reference']), before)


def test_lora_reference_with_adapters_off_equals_a_frozen_copy_of_the_base(pairs_file, tmp_path):
  """LoRA's reference is frozen['base'] (no second copy); it gives the same loss as the base
  loaded as a separate reference model (dpo.reference=<dir>)."""
  lora = ['--config.finetune.method=lora', '--config.finetune.rank=4']
  config = _config(pairs_file, 'dpo', *lora)
  programs = _programs(config)
  key = jax.random.PRNGKey(0)
  params = programs.init_params(key)
  native.save_flaxllm(programs.model_cfg, jax.device_get(params), str(tmp_path / 'base'))
  trainable, frozen = programs.split(params, key)
  assert set(frozen) == {'base'}
  state = programs.init(trainable, key)
  batch = parallel.shard_batch(_batch(config, programs), programs.mesh, programs.rules)
  for _ in range(3):                               # adapters away from zero
    state, _ = programs.train_step(state, batch, frozen)
  with_copy = _config(pairs_file, 'dpo', *lora, f'--config.dpo.reference={tmp_path}/base')
  copy_programs = _programs(with_copy)
  loaded = copy_programs.objective.load_frozen(copy_programs.mesh, copy_programs.rules)
  a = programs.eval_step(state.params, batch, frozen)
  b = copy_programs.eval_step(state.params, batch, {**frozen, **loaded})
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


@pytest.mark.parametrize('loss_type', ['sigmoid', 'ipo', 'simpo', 'orpo'])
def test_dpo_variants_train_through_the_trainer(pairs_file, tmp_path, loss_type):
  summary = trainer.train(_config(pairs_file, 'dpo', f'--config.dpo.loss_type={loss_type}',
                                  '--config.sample.max_new_tokens=0', steps=12),
                          str(tmp_path / loss_type))
  rows = [json.loads(x) for x in open(tmp_path / loss_type / 'metrics.jsonl')]
  train = [r for r in rows if 'loss' in r]
  assert summary['complete'] and {'margin', 'accuracy', 'rewards_chosen'} <= set(train[-1])
  assert train[-1]['loss'] < train[0]['loss'] and np.isfinite(summary['val_loss'])
  assert 'val_accuracy' in summary and 'val_ppl' not in summary   # a pairwise loss: no ppl


def test_sharded_dpo_equals_one_device(pairs_file, tmp_path):
  flags = ['--config.sample.max_new_tokens=0']
  one = trainer.train(_config(pairs_file, 'dpo', *flags, steps=4), str(tmp_path / 'one'),
                      devices=jax.devices()[:1])
  eight = trainer.train(_config(pairs_file, 'dpo', *flags, '--config.mesh.data=2',
                                '--config.mesh.fsdp=4', steps=4), str(tmp_path / 'eight'))
  read = lambda w: [json.loads(x)['loss'] for x in open(w / 'metrics.jsonl') if '"loss"' in x]
  np.testing.assert_allclose(read(tmp_path / 'eight'), read(tmp_path / 'one'), rtol=1e-5)
  np.testing.assert_allclose(eight['val_loss'], one['val_loss'], rtol=1e-5)


def test_reward_model_learns_the_rule_exports_and_scores_like_transformers(pairs_file,
                                                                          tmp_path, capsys):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  workdir = tmp_path / 'rm'
  summary = trainer.train(_config(pairs_file, 'reward', '--config.sample.max_new_tokens=0',
                                  steps=40), str(workdir))
  assert summary['complete'] and summary['val_accuracy'] >= 0.9, summary
  # The command scores held-out pairs (new ones, from another seed).
  held_out = tmp_path / 'held_out.jsonl'
  held_out.write_text(''.join(json.dumps(r) + '\n' for r in _pairs(64, seed=1)))
  capsys.readouterr()
  assert reward_cmd.main([f'--model={workdir}', f'--data={held_out}', '--seq-len=48']) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result['pairs'] == 64 and result['accuracy'] >= 0.9
  # The Hugging Face export is a LlamaForSequenceClassification with the same scores.
  model_cfg, params, head = reward.load_reward_model(str(workdir))
  hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(workdir / reward.HF_DIR)).eval()
  rows = _rows(model_cfg, batch=2, seq=12)
  rows['segment_ids'][1, 9:] = 0                    # right padding: the last real token is 8
  tokens = np.where(rows['segment_ids'] > 0, rows['inputs'], hf_model.config.pad_token_id)
  with torch.no_grad():
    want = hf_model(torch.tensor(tokens.astype(np.int64)),
                    attention_mask=torch.tensor(rows['segment_ids'])).logits[:, 0].numpy()
  got = reward.rewards(model_cfg, params, head, {**rows, 'inputs': tokens})
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_preference_input_is_one_sentence(pairs_file, tmp_path):
  unpaired = tmp_path / 'kto.jsonl'
  unpaired.write_text(json.dumps({'prompt': 'p', 'completion': 'c', 'label': True}) + '\n')
  config = config_lib.load_config(TINY, ['--config.objective=dpo', '--config.data.source=jsonl',
                                         f'--config.data.path={unpaired}'])
  with pytest.raises(ConfigError, match=r"objective='dpo' with dpo\.loss_type='sigmoid' trains "
                                        r'on \(prompt, chosen, rejected\) pairs but .* holds '
                                        r'unpaired records'):
    trainer.train(config, str(tmp_path / 'run'))
  with pytest.raises(ConfigError, match=r"dpo\.loss_type='kto2' is not known"):
    _config(pairs_file, 'dpo', '--config.dpo.loss_type=kto2')
  with pytest.raises(ConfigError, match=r"uses no reference model"):
    _config(pairs_file, 'dpo', '--config.dpo.loss_type=simpo', f'--config.dpo.reference={REPO}')
  other = models.ModelConfig.from_dict({**_config(pairs_file, 'dpo').model.to_dict(),
                                        'num_layers': 3})
  native.save_flaxllm(other, models.init_params(models.build(other), jax.random.key(0)),
                      str(tmp_path / 'other'))
  config = _config(pairs_file, 'dpo', f'--config.dpo.reference={tmp_path}/other')
  with pytest.raises(ConfigError, match=r"dpo\.reference=.* do not match the model config"):
    trainer.train(config, str(tmp_path / 'run2'))


def test_kto_on_unpaired_data(tmp_path):
  """dpo.loss_type='kto': unpaired (prompt, completion, label) examples and KL rows of each
  prompt with the next example's completion; the loss at policy = reference is
  w (1 - sigma(0)) = 0.5 per example."""
  from flaxllm.data import preference
  path = tmp_path / 'kto.jsonl'
  records = [{'prompt': r['prompt'], 'completion': r[side], 'label': side == 'chosen'}
             for r in _pairs(200) for side in ('chosen', 'rejected')]
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  config = _config(str(path), 'dpo', '--config.dpo.loss_type=kto',
                   '--config.sample.max_new_tokens=0', steps=10)
  programs = _programs(config)
  batch = _batch(config, programs)
  kl = preference.mismatched_rows(batch, pad_id=0)
  real = batch['segment_ids'].sum(-1) > 0
  full = lambda b, i: np.concatenate([b['inputs'][i, :1], b['targets'][i][b['segment_ids'][i] > 0]])
  prompt_of = lambda b, i: full(b, i)[:np.argmax(b['loss_mask'][i] > 0) + 1]
  completion_of = lambda b, i: full(b, i)[np.argmax(b['loss_mask'][i] > 0) + 1:]
  for i in np.flatnonzero(real)[:3]:
    np.testing.assert_array_equal(prompt_of(kl, i), prompt_of(batch, i))
    np.testing.assert_array_equal(completion_of(kl, i), completion_of(batch, (i + 1) % len(real)))
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  state = programs.init(trainable, key)
  hooked = programs.objective.batch_hook(ByteTokenizer(), slice(None))(0, batch, None)
  _, metrics = programs.train_step(state, parallel.shard_batch(hooked, programs.mesh,
                                                               programs.rules), frozen)
  np.testing.assert_allclose(metrics['loss'], 0.5, rtol=1e-6)
  summary = trainer.train(config, str(tmp_path / 'run'))
  assert summary['complete'] and np.isfinite(summary['val_loss'])


@pytest.mark.parametrize('kto', [False, True], ids=['pairs', 'kto'])
def test_stored_reference_logps_train_exactly_as_the_live_reference(pairs_file, tmp_path, kto):
  """`flaxllm reference-logps` stores the reference's log-probs of every train batch; DPO (and
  KTO) with them gives the losses of DPO with the live frozen reference, and holds no reference
  model."""
  from flaxllm.train import reference_logps as reference_cmd
  data = pairs_file
  if kto:
    data = str(tmp_path / 'kto.jsonl')
    records = [{'prompt': r['prompt'], 'completion': r[side], 'label': side == 'chosen'}
               for r in _pairs(200) for side in ('chosen', 'rejected')]
    (tmp_path / 'kto.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  base = _config(data, 'dpo', '--config.sample.max_new_tokens=0', steps=6)
  start = tmp_path / 'start'
  params = models.init_params(models.build(base.model), jax.random.key(5))
  native.save_flaxllm(base.model, params, str(start))
  flags = [f'--config.{k}={v}' for k, v in (
      ('objective', 'dpo'), ('data.source', 'jsonl'), ('data.path', data),
      ('data.val_fraction', 0.1), ('total_steps', 6), ('seq_len', 48), ('batch_size', 8),
      ('eval_every', 0), ('ckpt_every', 6), ('log_every', 1), ('peak_flops', 1e11),
      ('wandb.mode', 'disabled'), ('schedule.warmup_steps', 2), ('optim.lr', 3e-3),
      ('sample.max_new_tokens', 0), ('init_from', start),
      ('dpo.loss_type', 'kto' if kto else 'sigmoid'))]
  assert reference_cmd.main([f'--config={TINY}', *flags, f'--out={tmp_path}/ref']) == 0
  live = trainer.train(config_lib.load_config(TINY, flags), str(tmp_path / 'live'))
  stored_flags = [*flags, f'--config.dpo.reference_logps={tmp_path}/ref']
  programs = trainer.build_programs(config_lib.load_config(TINY, stored_flags))
  assert 'reference' not in programs.abstract_frozen
  stored = trainer.train(config_lib.load_config(TINY, stored_flags), str(tmp_path / 'stored'))
  read = lambda w: [json.loads(x)['loss'] for x in open(w / 'metrics.jsonl') if '"loss"' in x]
  np.testing.assert_allclose(read(tmp_path / 'stored'), read(tmp_path / 'live'), rtol=1e-5)
  assert live['complete'] and stored['complete']
