"""Fine-tuning through the trainer (config.finetune.method): the compiled train step moves only
the trainable tree (LoRA adapters / the unfrozen params) and leaves every frozen base array
bitwise unchanged; optimizer state exists only for the trainable tree; an end-to-end LoRA run
on instruction data starts from init_from, lowers the response loss, and exports the merged
model and a PEFT adapter."""
import json
import os

import jax
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import lora, rundir
from flaxllm.models import params as params_lib
from flaxllm.peft import quant
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'
_WORDS = ('alpha', 'branch', 'cobalt', 'delta', 'ember', 'falcon', 'garnet', 'harbor', 'indigo',
          'jasper', 'kernel', 'lumen', 'marble', 'nectar', 'onyx', 'pepper')
RECORDS = [{'instruction': 'Reverse the word.', 'input': a + b, 'output': (a + b)[::-1]}
           for a in _WORDS for b in _WORDS[:8]]   # 128 distinct records


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('peft_train')
  path = root / 'data.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in RECORDS))
  return root, str(path)


def _config(data_path, **kw):
  values = {'data.source': 'jsonl', 'data.path': data_path, 'data.format': 'alpaca',
            'data.val_fraction': 0.2, 'sample.max_new_tokens': 0, 'wandb.mode': 'disabled',
            'seq_len': 64, 'batch_size': 8, **kw}
  return config_lib.load_config(TINY, [f'--config.{k}={v}' for k, v in values.items()])


def _batch(config):
  rng = np.random.default_rng(0)
  b, s = config.batch_size, config.seq_len
  tokens = rng.integers(3, 40, (b, s + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'positions': np.tile(np.arange(s, dtype=np.int32), (b, 1)),
          'segment_ids': np.ones((b, s), np.int32), 'loss_mask': np.ones((b, s), np.float32)}


@pytest.mark.parametrize('method', ['lora', 'qlora', 'freeze'])
def test_trainer_step_leaves_the_base_bitwise_unchanged(data, method):
  config = _config(data[1], **{'finetune.method': method, 'finetune.rank': 4,
                               'finetune.train': 'layers_1/,final_norm/',
                               'optim.lr': 1e-2, 'schedule.warmup_steps': 0})
  programs = trainer.build_programs(config)
  key = jax.random.PRNGKey(0)
  params = programs.init_params(key)
  before = jax.tree.map(np.array, params)
  trainable, frozen = programs.split(params, key)     # params are donated
  base_before = jax.tree.map(np.array, frozen['base'])
  start = jax.tree.map(np.array, trainable)
  state = programs.init(trainable, key)
  batch = _batch(config)
  losses = []
  for _ in range(5):
    state, metrics = programs.train_step(state, batch, frozen)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  for x, y in zip(jax.tree.leaves(frozen['base']), jax.tree.leaves(base_before)):
    np.testing.assert_array_equal(np.asarray(x), y)      # bitwise unchanged
  moved = [bool(np.any(np.asarray(x) != y)) for x, y in zip(jax.tree.leaves(state.params),
                                                            jax.tree.leaves(start))]
  assert all(moved)
  n_trainable = sum(x.size for x in jax.tree.leaves(state.params))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert n_opt <= 2 * n_trainable + 4                    # AdamW moments (+ counters) only
  cfg = programs.model_cfg
  flat = params_lib.flatten(before)
  if method in ('lora', 'qlora'):
    expected = sum(4 * (int(np.prod(lora.kernel_dims(p, x.shape)[1])) +
                        int(np.prod(lora.kernel_dims(p, x.shape)[2])))
                   for p, x in flat.items() if p.endswith('kernel') and 'lm_head' not in p)
    assert n_trainable == expected
    if method == 'qlora':
      q = [x for x in jax.tree.leaves(frozen['base'], is_leaf=quant.is_quantized)
           if quant.is_quantized(x)]
      assert len(q) == 7 * cfg.num_layers
    else:  # the base is the init params, not a copy that drifted
      for p, x in params_lib.flatten(base_before).items():
        np.testing.assert_array_equal(x, flat[p])
  else:
    assert set(params_lib.flatten(state.params['model'])) == {
        p for p in flat if 'layers_1/' in p or 'final_norm/' in p}


def test_lora_run_from_init_from_exports_adapter_and_merged_model(data, tmp_path):
  from flaxllm.interop import native
  from flaxllm.interop import peft as peft_io
  from flaxllm import models
  # A base model directory (`flaxllm convert` layout) to start from.
  base_cfg = _config(data[1])
  model_cfg = models.ModelConfig.from_dict(base_cfg.model)
  params = models.init_params(models.build(model_cfg), jax.random.PRNGKey(3))
  native.save_flaxllm(model_cfg, params, str(tmp_path / 'base'))
  config = _config(data[1], **{'finetune.method': 'lora', 'finetune.rank': 8,
                               'finetune.targets': 'all-linear,lm_head',
                               'init_from': str(tmp_path / 'base'), 'total_steps': 30,
                               'optim.lr': 3e-2, 'eval_every': 0, 'ckpt_every': 30,
                               'schedule.warmup_steps': 2})
  workdir = str(tmp_path / 'run')
  summary = trainer.train(config, workdir)
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  train_losses = [r['loss'] for r in rows if 'loss' in r]
  assert train_losses[-1] < train_losses[0] - 0.3, train_losses
  assert summary['val_loss'] < train_losses[0]
  # Exports: the merged model (flaxllm layout) and the PEFT adapter.
  _, merged = native.load_flaxllm(os.path.join(workdir, rundir.MODEL_DIR))
  adapters = peft_io.load_adapter(os.path.join(workdir, 'adapter'), model_cfg)
  np.testing.assert_allclose(
      params_lib.flatten(lora.merge(params, adapters))['decoder/layers_0/attn/q_proj/kernel'],
      params_lib.flatten(merged)['decoder/layers_0/attn/q_proj/kernel'], atol=1e-6)
  again = trainer.train(config, workdir)  # resume: the run is complete, same val loss
  assert again['complete'] and abs(again['val_loss'] - summary['val_loss']) < 1e-6
