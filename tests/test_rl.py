"""GRPO through the trainer (flaxllm.objectives.align.grpo): rollouts generated inside the loop,
programmatic rewards (experiments/rlhf/rewards.py), the loss aggregations as sums, a run that
raises the reward, kill -9 and resume bitwise, sharded equal to one device, bad input in one
sentence. The per-token loss, advantages and aggregations themselves are checked against TRL in
tests/test_align_losses.py."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import parallel
from flaxllm.models.config import ConfigError
from flaxllm.objectives.align import losses, rollout
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'
REWARD = 'experiments.rlhf.rewards:true_rewards'


@pytest.fixture(scope='module')
def prompts_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('prompts') / 'prompts.jsonl'
  path.write_text(''.join(json.dumps({'prompt': f'# step {i}\n'}) + '\n' for i in range(64)))
  return str(path)


def _flags(prompts_file, steps, *extra):
  return ['--config.objective=grpo', '--config.data.source=jsonl',
          f'--config.data.path={prompts_file}', '--config.data.val_fraction=0.1',
          f'--config.grpo.reward_funcs={REWARD}', '--config.seq_len=32',
          '--config.batch_size=16', '--config.grpo.group_size=4', f'--config.total_steps={steps}',
          '--config.optim.lr=1e-2', '--config.schedule.name=constant',
          '--config.schedule.warmup_steps=0', '--config.log_every=1', '--config.eval_every=0',
          '--config.grpo.eval_prompts=4', '--config.grpo.max_prompt_len=12',
          '--config.peak_flops=1e11', '--config.wandb.mode=disabled', *extra]


def _config(prompts_file, steps, *extra):
  return config_lib.load_config(TINY, _flags(prompts_file, steps, *extra))


def _losses(workdir) -> dict:
  return {r['step']: (r['loss'], r['reward']) for r in
          (json.loads(x) for x in open(os.path.join(workdir, 'metrics.jsonl'))) if 'loss' in r}


def test_rollout_rows_by_hand():
  tokens = np.array([[0, 0, 1, 7], [1, 5, 6, 7]], np.int32)     # left-padded prompts
  mask = tokens > 0
  completion = np.array([[8, 2, 0], [9, 9, 9]], np.int32)      # [8, EOS] and 3 tokens
  rows = rollout.rollout_rows(tokens, mask, completion, np.array([2, 3]), pad_id=0)
  np.testing.assert_array_equal(rows['inputs'], [[0, 0, 1, 7, 8, 2], [1, 5, 6, 7, 9, 9]])
  np.testing.assert_array_equal(rows['targets'], [[0, 1, 7, 8, 2, 0], [5, 6, 7, 9, 9, 9]])
  np.testing.assert_array_equal(rows['positions'], [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(rows['segment_ids'], [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(rows['loss_mask'], [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
  right = rollout.right_aligned(rows, pad_id=0)
  np.testing.assert_array_equal(right['inputs'][0], [1, 7, 8, 2, 0, 0])
  np.testing.assert_array_equal(right['segment_ids'][0], [1, 1, 1, 1, 0, 0])


@pytest.mark.parametrize('loss_type', ['grpo', 'bnpo', 'dr_grpo', 'dapo'])
def test_the_loss_as_a_sum_over_its_divisor_is_the_aggregated_loss(prompts_file, loss_type):
  config = _config(prompts_file, 4, f'--config.grpo.loss_type={loss_type}',
                   '--config.grpo.beta=0.04')
  programs = trainer.build_programs(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
  objective = programs.objective
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  b, s = 8, config.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 200, (b, s + 1)).astype(np.int32)
  mask = np.zeros((b, s), np.float32)
  for i in range(b):
    mask[i, 10:10 + 2 + i] = 1
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.tile(np.arange(s, dtype=np.int32), (b, 1)),
           'segment_ids': np.ones((b, s), np.int32), 'loss_mask': mask,
           'advantages': rng.normal(size=b).astype(np.float32),
           'reward': rng.normal(size=b).astype(np.float32)}
  model = objective.build_model(train=False)
  logps = np.asarray(objective.sampler.token_logps(objective.plain_params(trainable, frozen),
                                                   batch))
  batch['old_logps'] = logps + rng.normal(0, 0.1, (b, s)).astype(np.float32) * mask
  # mu = 2 passes: the sampler's (here perturbed) log-probs are the old policy; one pass: the
  # current log-probs are (ratio 1, as TRL's), and the batch's old_logps are not read.
  two_passes = type(objective)(config_lib.load_config(TINY, _flags(
      prompts_file, 4, f'--config.grpo.loss_type={loss_type}', '--config.grpo.beta=0.04',
      '--config.grpo.num_iterations=2')))
  for loss_fn, old in ((two_passes.train_loss(model), batch['old_logps']),
                       (objective.train_loss(model), logps)):
    objective_sum, sums = loss_fn(trainable, frozen,
                                  {k: jnp.asarray(v) for k, v in batch.items()})
    ref = logps   # the reference is the starting params: the same log-probs
    want = losses.grpo_token_loss(logps, old, ref, batch['advantages'], mask, beta=0.04,
                                  loss_type=loss_type, max_completion_length=s + 1 - 12)
    np.testing.assert_allclose(objective_sum / sums['tokens'], want, rtol=1e-5)


def test_a_tiny_run_raises_the_reward(prompts_file, tmp_path):
  summary = trainer.train(_config(prompts_file, 30), str(tmp_path / 'run'))
  rewards = [r for _, r in sorted(_losses(tmp_path / 'run').values())]
  rows = _losses(tmp_path / 'run')
  first = np.mean([rows[s][1] for s in range(1, 6)])
  last = np.mean([rows[s][1] for s in range(26, 31)])
  assert summary['complete'] and last > first + 0.03, (first, last, rewards)
  assert 'reward_true_rewards' in summary


def test_killed_and_resumed_grpo_matches_uninterrupted_bitwise(prompts_file, tmp_path):
  env = {**os.environ, 'WANDB_MODE': 'disabled', 'JAX_COMPILATION_CACHE_DIR':
         str(tmp_path / 'jax_cache'), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
         'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
  cmd = lambda w: [sys.executable, '-m', 'flaxllm.cli', 'train', f'--config={TINY}',
                   f'--workdir={w}', *_flags(prompts_file, 12, '--config.ckpt_every=4',
                                             '--config.grpo.num_iterations=2')]
  ref = subprocess.run(cmd(tmp_path / 'ref'), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  workdir = tmp_path / 'killed'
  proc = subprocess.Popen(cmd(workdir), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '4').exists() and proc.poll() is None and \
      time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert 4 <= max(_losses(workdir)) < 12
  out = subprocess.run(cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0 and 'Resuming' in out.stdout, out.stderr[-3000:]
  assert _losses(workdir) == _losses(tmp_path / 'ref')


def test_sharded_grpo_equals_one_device(prompts_file, tmp_path):
  one = trainer.train(_config(prompts_file, 3), str(tmp_path / 'one'), devices=jax.devices()[:1])
  eight = trainer.train(_config(prompts_file, 3, '--config.mesh.data=2', '--config.mesh.fsdp=4'),
                        str(tmp_path / 'eight'))
  a, b = _losses(tmp_path / 'one'), _losses(tmp_path / 'eight')
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5,
                             atol=1e-7)
  assert one['reward'] == pytest.approx(eight['reward'], abs=1e-6)


def test_bad_grpo_settings_are_one_sentence(prompts_file):
  cases = [
      ('--config.grpo.group_size=1', r'grpo\.group_size=1 must be at least 2'),
      ('--config.grpo.reward_funcs=no_such_module:f', r"reward function "
                                                      r"'no_such_module:f' cannot be imported"),
      ('--config.grpo.reward_funcs=tests_helpers_missing', r'cannot be imported'),
      ('--config.grpo.reward_funcs=test_rl:wrong_shape', r'reward function test_rl:'
                                                           r'wrong_shape returned shape \(2,\)'),
      ('--config.batch_size=10', r'batch_size=10 \(completions per step\) is not a multiple'),
  ]
  for override, message in cases:
    with pytest.raises(ConfigError, match=message):
      _config(prompts_file, 4, override)


def wrong_shape(prompts, completions):
  """A broken reward function: two rewards whatever the number of completions."""
  del prompts, completions
  return [0.0, 1.0]


# ----------------------------------------------------------------------------- PPO

def _ppo(prompts_file, steps, *extra):
  flags = [f.replace('grpo.', 'ppo.') for f in _flags(prompts_file, steps)
           if 'group_size' not in f and 'objective=' not in f]
  return config_lib.load_config(TINY, ['--config.objective=ppo', *flags,
                                       '--config.ppo.minibatches=2', '--config.ppo.epochs=2',
                                       *extra])


@pytest.mark.parametrize('value_model', ['shared', 'copy'])
def test_ppo_rollout_statistics_and_training(prompts_file, tmp_path, value_model):
  config = _ppo(prompts_file, 4, f'--config.ppo.value_model={value_model}',
                '--config.ckpt_every=2')
  summary = trainer.train(config, str(tmp_path / value_model))
  rows = _losses(tmp_path / value_model)
  assert summary['complete'] and len(rows) == 4 and all(np.isfinite(l) for l, _ in rows.values())
  programs = trainer.build_programs(config)
  assert ('value_model' in programs.abstract_state.params) == (value_model == 'copy')
  # One rollout by hand: advantages and returns live on the completion (and the position
  # after it), the per-token rewards sum to the score minus the KL penalty.
  objective = programs.objective
  key = jax.random.PRNGKey(0)
  trainable, frozen = programs.split(programs.init_params(key), key)
  from flaxllm.data.tokenizer import ByteTokenizer
  from flaxllm.objectives import base
  tok = ByteTokenizer()
  it = objective.data_iterator(tok, 'train', seq_len=config.seq_len,
                               batch_size=config.batch_size, seed=0)
  hook = objective.batch_hook(tok, slice(None))
  batch = hook(0, next(it), base.Policy(trainable, frozen,
                                         lambda: programs.plain_params(trainable, frozen)))
  it.close()
  mask = batch['loss_mask'] > 0
  assert not np.any(batch['advantages'][~(batch['value_mask'] > 0)])
  assert np.all((batch['value_mask'] > 0) >= mask)        # the completion and one more
  assert np.all(batch['old_logps'][mask] < 0) and not np.any(batch['old_logps'][~mask])
  assert batch['reward'].shape == (config.batch_size,)


def test_ppo_resumes_bitwise(prompts_file, tmp_path):
  whole = trainer.train(_ppo(prompts_file, 4, '--config.ckpt_every=2'), str(tmp_path / 'whole'))
  trainer.train(_ppo(prompts_file, 2, '--config.ckpt_every=2'), str(tmp_path / 'half'))
  again = trainer.train(_ppo(prompts_file, 4, '--config.ckpt_every=2'), str(tmp_path / 'half'))
  assert _losses(tmp_path / 'half') == _losses(tmp_path / 'whole')
  assert again['reward'] == whole['reward']
