"""The objective protocol (flaxllm.objectives): a new objective is a class and a registry entry,
and it trains, checkpoints and resumes through `trainer.train` with no change to the trainer;
objective settings are checked in one sentence before anything compiles."""
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import config as config_lib
from flaxllm import parallel, rundir
from flaxllm.models import losses
from flaxllm.models.config import ConfigError
from flaxllm.objectives import base, lm, registry
from flaxllm.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'


class ScaledLM(lm.LanguageModel):
  """A toy objective defined here: next-token prediction through a learned logit scale, a
  trainable tensor of the objective's own (the trainable tree's `logit_scale`), next to the
  model's params."""
  name = 'scaled_lm'

  def split(self, params, rng):
    trainable, frozen = super().split(params, rng)
    return {**trainable, 'logit_scale': jnp.ones((), jnp.float32)}, frozen

  def trainable_specs(self, param_specs, abstract_trainable):
    return {**super().trainable_specs(param_specs, abstract_trainable),
            'logit_scale': jax.sharding.PartitionSpec()}

  def train_loss(self, model) -> base.LossFn:
    def loss_fn(params, frozen, batch, rng=None):
      logits = lm.forward(model, self.model_params(params, frozen), batch, rng)
      objective, sums = losses.lm_sums(logits * params['logit_scale'], batch)
      return objective, {**sums, 'scale': params['logit_scale'] * sums['tokens']}
    return loss_fn


@pytest.fixture
def scaled_lm(monkeypatch):
  monkeypatch.setitem(registry.REGISTRY, ScaledLM.name, ScaledLM)


def _config(*overrides, steps=6):
  return config_lib.load_config(TINY, [
      f'--config.total_steps={steps}', '--config.objective=scaled_lm', '--config.ckpt_every=3',
      '--config.eval_every=3', '--config.eval_batches=1', '--config.log_every=1',
      '--config.sample.max_new_tokens=0', '--config.schedule.name=constant',
      '--config.schedule.warmup_steps=0', '--config.peak_flops=1e11',
      '--config.wandb.mode=disabled', *overrides])


def _train_losses(workdir) -> dict:
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return {r['step']: (r['loss'], r['scale']) for r in rows if 'loss' in r}


def test_an_objective_defined_here_trains_checkpoints_and_resumes_exactly(scaled_lm, tmp_path):
  whole = trainer.train(_config(), str(tmp_path / 'whole'))
  assert whole['complete'] and whole['step'] == 6
  losses = _train_losses(tmp_path / 'whole')
  assert losses[6][0] < losses[1][0]
  assert losses[6][1] != 1.0                       # the objective's own tensor trained
  # Its trainable tree is checkpointed (the model's params and the objective's scale).
  programs = trainer.build_programs(_config())
  state = rundir.Checkpoints(str(tmp_path / 'whole')).restore(
      6, programs.abstract_state)[0]
  assert set(state.params) == {'model', 'logit_scale'}
  # Stop after 3 steps, resume to 6: the same losses and final validation, bit for bit.
  half = trainer.train(_config(steps=3), str(tmp_path / 'resumed'))
  assert half['step'] == 3
  resumed = trainer.train(_config(), str(tmp_path / 'resumed'))
  assert _train_losses(tmp_path / 'resumed') == losses
  assert resumed['val_loss'] == whole['val_loss']


def test_unknown_objective_lists_the_known_ones():
  known = re.escape(str(sorted(registry.REGISTRY)))
  assert {'lm', 'distill', 'seq2seq', 'reward', 'dpo', 'grpo', 'ppo'} <= set(registry.REGISTRY)
  with pytest.raises(ConfigError, match=rf"^objective='dpo_typo' is not a known objective; "
                                        rf"choose one of {known}\.$"):
    config_lib.load_config(TINY, ['--config.objective=dpo_typo'])


def test_settings_of_another_objective_are_not_silently_ignored():
  with pytest.raises(ConfigError, match=r"^distill\.alpha is set but objective='lm' does not "
                                        r'use it; set --config\.objective=distill'):
    config_lib.load_config(TINY, ['--config.distill.alpha=0.9'])
  with pytest.raises(ConfigError, match=r"^objective='distill' needs a teacher"):
    config_lib.load_config(TINY, ['--config.objective=distill'])


def test_objective_and_model_architecture_must_agree():
  with pytest.raises(ConfigError, match=r"^objective='lm' trains model\.arch='decoder' models "
                                        r"but model\.arch='encoder_decoder'"):
    config_lib.load_config(TINY, ['--config.model.arch=encoder_decoder',
                                  '--config.model.position=sinusoidal'])


def test_every_objective_builds_and_its_sections_are_in_the_base_config():
  c = config_lib.base_config()
  for name, cls in registry.REGISTRY.items():
    assert cls.name == name
    if cls.section:
      assert c[cls.section].to_dict() == cls.config_section().to_dict()
  assert c.finetune.method == 'full'


def test_trainable_tree_is_namespaced(tmp_path):
  """The model's params live under 'model' in the trainable tree for every fine-tuning method,
  and the plain params are the model's tree again."""
  for method in ('full', 'freeze', 'lora'):
    config = config_lib.load_config(TINY, [f'--config.finetune.method={method}',
                                           '--config.finetune.train=final_norm/'])
    programs = trainer.build_programs(config, parallel.make_mesh(config.mesh, jax.devices()[:1]))
    assert set(programs.abstract_state.params) == {'model'}
    key = jax.random.PRNGKey(0)
    params = programs.init_params(key)
    reference = jax.tree.map(np.asarray, params)
    trainable, frozen = programs.split(params, key)
    plain = programs.plain_params(trainable, frozen)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-6), plain,
                 reference)
