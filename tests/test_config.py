"""Experiment configs: files and variants, typed overrides, validation messages, resume checks."""
import json
import glob
import os
import re

import pytest

from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, 'configs', 'default.py')


def _load(*overrides, spec=DEFAULT):
  return config_lib.load_config(spec, [f'--config.{o}' for o in overrides])


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))))
def test_every_config_file_validates_and_documents_its_command(path):
  config = config_lib.load_config(path)
  assert config.is_locked
  name = os.path.relpath(path, REPO)
  doc = open(path).read().split('"""')[1]
  assert f'flaxllm train --config={name}' in doc, f'{name}: docstring must give its command'


def test_variants_are_typed_and_checked():
  tiny = config_lib.load_config(f'{DEFAULT}:size=tiny,steps=7')
  assert tiny.total_steps == 7 and tiny.model.d_model == 32 and tiny.tokenizer.kind == 'bytes'
  default = config_lib.load_config(DEFAULT)
  assert default.model.vocab_size == 4096 and default.tokenizer.kind == 'sentencepiece'
  arg = config_lib.parse_arg('steps=5,quick,lr=1e-3', steps=1, quick=False, lr=0.1, name='x')
  assert (arg.steps, arg.quick, arg.lr, arg.name) == (5, True, 1e-3, 'x')
  arg = config_lib.parse_arg('budgets=(3e11,1e12),n=2', budgets=(1.0,), n=1)
  assert tuple(arg.budgets) == (3e11, 1e12) and arg.n == 2  # commas in brackets stay together
  with pytest.raises(ConfigError, match=r"^unknown config variant 'stpes' in 'stpes=3'; allowed "
                                        r"variants are \['size', 'steps'\]\.$"):
    config_lib.load_config(f'{DEFAULT}:stpes=3')
  with pytest.raises(ConfigError, match=r"^steps='many' has type str but must be int"):
    config_lib.load_config(f'{DEFAULT}:steps=many')
  with pytest.raises(ConfigError, match=r"^config file 'nope\.py' does not exist; pass "
                                        r'--config=configs/default\.py'):
    config_lib.load_config('nope.py')


def test_overrides_use_the_types_of_the_defaults():
  c = _load('optim.lr=3e-4', 'total_steps=1e3', 'model.num_kv_heads=1', 'optim.wd_exclude=a,b$',
            'data.shuffle=false', 'wandb.name=123', 'z_loss=0', 'model.dtype=bfloat16',
            'data.glob=**/*.txt', 'schedule.warmup_steps=10')
  assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
  assert c.total_steps == 1000 and isinstance(c.total_steps, int)
  assert c.model.num_kv_heads == 1
  assert tuple(c.optim.wd_exclude) == ('a', 'b$')
  assert c.data.shuffle is False
  assert c.wandb.name == '123'                      # strings stay strings
  assert c.z_loss == 0.0 and isinstance(c.z_loss, float)
  assert c.data.glob == '**/*.txt'


@pytest.mark.parametrize('override, message', [
    ('optim.lrr=1', r"unknown config key 'optim.lrr'; remove it or fix the name \(did you mean "
                    r"'optim.lr'\?\)\."),
    ('modle.d_model=4', r"unknown config key 'modle.d_model'; remove it or fix the name \(did you "
                        r"mean 'model.d_model'\?\)\."),
    ('optim=3', r'optim is a group of settings; override one of its keys, e\.g\. '
                r'--config\.optim\.\w+=\.\.\.'),
    ('total_steps=abc', r"total_steps='abc' has type str but must be int \(like its current value"
                        r" {total}\); write e\.g\. --config\.total_steps=<int>\."),
    ('total_steps=1.5', r'total_steps=1\.5 has type float but must be int'),
    ('total_steps=0', r'total_steps must be positive, got 0; set --config\.total_steps=<number>\.'),
    ('optim.lr=-1', r'optim\.lr must be positive, got -1\.0; set --config\.optim\.lr=<number>\.'),
    ('optim.name=adamm', r"optim\.name='adamm' is not a known optimizer; choose one of \('adamw', "
                         r"'adam', 'sgd', 'lion'\)\."),
    ('schedule.name=cos', r"schedule\.name='cos' is not a known schedule; choose one of "
                          r"\('cosine', 'linear', 'constant', 'rsqrt'\)\."),
    ('optim.accum_steps=3', r'batch_size=8 is not divisible by optim\.accum_steps=3; make '
                            r'batch_size a multiple of accum_steps\.'),
    ('optim.b2=1.0', r'optim\.b1=0\.9 and optim\.b2=1\.0 must be in \[0, 1\); use e\.g\. 0\.9 and '
                     r'0\.95\.'),
    ('schedule.warmup_steps=4000', r'schedule\.warmup_steps=4000 exceeds total_steps={total}; '
                                  r'lower the warmup or raise total_steps\.'),
    ('optim.wd_exclude=norm(', r"optim\.wd_exclude pattern 'norm\(' is not a valid regex"),
    ('model.num_heads=7', r'model\.num_heads=7 does not divide model\.d_model=256; pick a divisor '
                          r'of d_model or set model\.head_dim\.'),
    ('model.mlp_activation=tanh', r"model\.mlp_activation='tanh' is not supported"),
    ('model.arch=encoder_decoder', r"model\.arch='encoder_decoder' uses absolute positions"),
    ('data.source=web', r"data\.source='web' is not known; choose one of \('stdlib', 'text', "
                        r"'tfds', 'jsonl', 'stdlib_pairs'\)\."),
    ('data.source=text', r"data\.source='text' needs data\.path; set "
                         r'--config\.data\.path=/path/to/text/files\.'),
    ('data.packing=greedy', r"data\.packing='greedy' is not known; use 'concat' or 'first_fit'\."),
    ('tokenizer.vocab_size=5000', r'tokenizer\.vocab_size=5000 does not fit model\.vocab_size='
                                  r'4096; set tokenizer\.vocab_size <= model\.vocab_size\.'),
    ('wandb.mode=cloud', r"wandb\.mode='cloud' is not known"),
    ('init_from=/does/not/exist', r"init_from='/does/not/exist' is not a directory"),
])
def test_bad_values_fail_with_one_sentence_naming_key_and_fix(override, message):
  with pytest.raises(ConfigError) as e:
    _load(override)
  text = str(e.value)
  message = message.replace('{total}', str(_load().total_steps))
  assert re.match(message, text), text
  assert '\n' not in text and text.endswith('.')


def test_learned_positions_limit_seq_len():
  _load('model.position=learned', 'seq_len=256')  # == max_seq_len: fine
  with pytest.raises(ConfigError, match=r'^seq_len=512 exceeds model\.max_seq_len=256 \(learned'
                                        r' positions\); lower seq_len or raise '
                                        r'model\.max_seq_len\.$'):
    _load('model.position=learned', 'seq_len=512')
  # RoPE has no table, but max_seq_len is still the longest sequence the model is made for
  # (rope scaling, caches and exports rely on it): refused too.
  with pytest.raises(ConfigError, match=r'^seq_len=512 exceeds model\.max_seq_len=256 \(the '
                                        r'longest sequence it is for\)'):
    _load('seq_len=512')


def test_resume_compatibility_allows_only_safe_keys():
  stored = config_lib.from_json(config_lib.to_json(_load()))  # tuples come back as lists
  config_lib.check_resume_compatible(stored, _load(), '/w')
  config_lib.check_resume_compatible(
      stored, _load('total_steps=500', 'log_every=1', 'wandb.name=x', 'eval_batches=2',
                    'sample.prompt=class '), '/w')
  for override, key in (('model.num_layers=2', 'model.num_layers'), ('seed=1', 'seed'),
                        ('batch_size=16', 'batch_size'), ('data.max_files=5', 'data.max_files'),
                        ('tokenizer.vocab_size=2048', 'tokenizer.vocab_size'),
                        ('optim.wd_exclude=x', 'optim.wd_exclude')):
    with pytest.raises(ConfigError, match=rf'^{re.escape(key)} is .* but the run in /w was '
                                          r'started with .*; resume with the same value or use '
                                          r'a new --workdir\.$'):
      config_lib.check_resume_compatible(stored, _load(override), '/w')


def test_a_run_stored_before_interleave_resumes_with_one_document_at_a_time():
  """config.json of a run from before data.interleave reads as interleave 1 (its data states
  are those of that pipeline): the default (64) is refused in one sentence naming the key, and
  --config.data.interleave=1 resumes."""
  stored = json.loads(config_lib.to_json(_load()))
  del stored['data']['interleave']
  old = config_lib.from_json(json.dumps(stored))
  assert old.data.interleave == 1
  with pytest.raises(ConfigError, match=r'^data\.interleave is 64 but the run in /w was started '
                                        r'with 1; resume with the same value'):
    config_lib.check_resume_compatible(old, _load(), '/w')
  config_lib.check_resume_compatible(old, _load('data.interleave=1'), '/w')
