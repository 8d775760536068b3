"""lm-eval tasks inside `flaxllm train` (`config.eval_tasks`, flaxllm.evaluation.in_training):
the metrics are logged at each evaluation, a killed-and-resumed run logs the same values as an
uninterrupted one, bad settings are one sentence, and the trainer names no feature."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import sysconfig

import pytest

pytest.importorskip('lm_eval')

from lm_eval.api.instance import Instance  # noqa: E402

from flaxllm import config as config_lib  # noqa: E402
from flaxllm import rundir  # noqa: E402
from flaxllm.data import corpus  # noqa: E402
from flaxllm.evaluation import harness, in_training  # noqa: E402
from flaxllm.train import main as main_lib  # noqa: E402
from flaxllm.train import trainer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'
KEY = 'harness/flaxllm_stdlib_docname/acc'


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp('eval_in_training')
  corpus = root / 'corpus'
  corpus.mkdir()
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()['stdlib'], '*.py')))
  for f in [f for f in files if 2_000 < os.path.getsize(f) < 40_000][:40]:
    shutil.copy(f, corpus)
  return {'root': root, 'corpus': str(corpus), 'data_dir': str(root / 'tfds')}


def _argv(env, workdir, **kw):
  values = {'data.source': 'text', 'data.path': env['corpus'], 'data.data_dir': env['data_dir'],
            'sample.max_new_tokens': 0, 'total_steps': 6, 'eval_every': 3, 'ckpt_every': 3,
            'eval_batches': 1, 'eval_tasks.tasks': "('flaxllm_stdlib_docname',)",
            'eval_tasks.limit': 4, 'eval_tasks.batch_size': 4, **kw}
  return [f'--config={TINY}', f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                                          for k, v in values.items()]


def _lines(workdir) -> dict:
  """step -> the union of that step's metrics.jsonl lines."""
  out = {}
  with open(os.path.join(workdir, rundir.METRICS_FILE), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      out.setdefault(row['step'], {}).update(row)
  return out


@pytest.fixture(scope='module')
def uninterrupted(env):
  workdir = str(env['root'] / 'whole')
  assert main_lib.train_main(_argv(env, workdir)) == 0
  return _lines(workdir)


def test_harness_metrics_are_logged_at_each_evaluation(uninterrupted):
  for step in (3, 6):
    harness = {k: v for k, v in uninterrupted[step].items() if k.startswith('harness/')}
    assert KEY in harness and 'harness/flaxllm_stdlib_docname/acc_norm' in harness, harness
    assert all(math.isfinite(v) for v in harness.values()), harness
    assert 0.0 <= harness[KEY] <= 1.0
  assert not any(k.startswith('harness/') for k in uninterrupted[1])


def test_resumed_run_logs_the_same_losses_and_harness_metrics(env, uninterrupted):
  workdir = str(env['root'] / 'resumed')
  assert main_lib.train_main(_argv(env, workdir, total_steps=3)) == 0
  assert main_lib.train_main(_argv(env, workdir)) == 0
  resumed = _lines(workdir)
  for step in range(1, 7):
    assert resumed[step]['loss'] == uninterrupted[step]['loss'], step
  for step in (3, 6):
    for key in ('val_loss', KEY, 'harness/flaxllm_stdlib_docname/acc_norm'):
      assert resumed[step][key] == uninterrupted[step][key], (step, key)


def _error(argv, capsys) -> str:
  assert main_lib.train_main(argv) == 1
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0, err
  return err


def test_bad_settings_are_one_sentence_before_compiling(env, tmp_path, capsys):
  err = _error(_argv(env, str(tmp_path / 'a'), **{'eval_tasks.tasks': 'no_such_task'}), capsys)
  assert "unknown task 'no_such_task'" in err and 'flaxllm_stdlib_docname' in err, err
  err = _error(_argv(env, str(tmp_path / 'b'), **{'eval_tasks.limit': -1}), capsys)
  assert 'eval_tasks.limit' in err, err
  err = _error(_argv(env, str(tmp_path / 'c'), **{'eval_tasks.every': 4}), capsys)
  assert 'multiple of eval_every' in err, err
  assert not os.path.exists(tmp_path / 'a' / rundir.METRICS_FILE)


def test_the_section_is_owned_by_evaluation_and_the_trainer_names_no_feature():
  assert config_lib.base_config().eval_tasks.to_dict() == in_training.config_section().to_dict()
  stored = json.loads(config_lib.to_json(config_lib.base_config()))
  del stored['eval_tasks']   # a run stored before the section existed
  assert config_lib.from_json(json.dumps(stored)).eval_tasks.tasks == ()
  source = open(os.path.join(REPO, 'flaxllm', 'train', 'trainer.py'), encoding='utf-8').read()
  for word in ('harness', 'lm_eval', 'eval_tasks'):
    assert word not in source, word


def test_rolling_loglikelihood_is_minus_the_eval_loss_times_its_tokens(env, uninterrupted,
                                                                       tmp_path):
  """One held-out document: `flaxllm eval`'s loss on it (trainer.evaluate_checkpoint, rows of
  BOS + text + EOS) times its token count equals minus the harness backend's rolling
  log-likelihood of the text (BOS-prefixed windows) plus the EOS prediction; its bits per byte
  are that over ln 2 x the text's bytes."""
  text = 'def f(x):\n    return x\n'
  data = tmp_path / 'data'
  data.mkdir()
  names = [f'doc{i}.py' for i in range(100)]
  held_out = next(n for n in names if corpus.split_of(n, 0.5) == 'validation')
  (data / held_out).write_text(text)
  (data / next(n for n in names if corpus.split_of(n, 0.5) == 'train')).write_text('x = 1\n' * 9)
  workdir = str(env['root'] / 'whole')
  config = main_lib.config_for(None, workdir, [
      f'--config.data.path={data}', '--config.data.val_fraction=0.5',
      '--config.data.packing=first_fit', f'--config.data.data_dir={tmp_path / "tfds"}'])
  result = trainer.evaluate_checkpoint(config, workdir, batches=1)
  lm = harness.FlaxLM(pretrained=workdir, batch_size=2)
  request = Instance(request_type='loglikelihood_rolling', doc={}, arguments=(text,), idx=0)
  rolling, = lm.loglikelihood_rolling([request], disable_tqdm=True)
  ids = [lm.prefix_token_id] + lm.tok_encode(text, add_special_tokens=False)
  (eos, _), = lm._loglikelihood_tokens([(None, ids, [lm.eot_token_id])])
  per_document = len(ids)                 # every text token and the EOS are predicted
  assert result['val_tokens'] % per_document == 0   # the document, once per row
  assert -result['val_loss'] * per_document == pytest.approx(rolling + eos, rel=1e-5)
  # Bits per byte: the same nats over ln 2 x the document's UTF-8 bytes (the EOS prediction
  # counted in the nats and as no byte).
  assert result['val_bpb'] == pytest.approx(-(rolling + eos) / (math.log(2) * len(text.encode())),
                                            rel=1e-5)

