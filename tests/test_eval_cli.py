"""`flaxllm eval --tasks=...`: flaxllm's own lm-eval tasks (flaxllm/evaluation/tasks/) through
the `flaxllm` backend on a tiny random model directory (nothing is downloaded), the results JSON
and per-sample logs, and bad input as one sentence.

The model is a random `tiny_llama` in flaxllm's own model-directory layout with the bytes
tokenizer (as test_harness.py's flaxllm-directory test, which builds it inline); its window is
160 tokens because `flaxllm_stdlib_nextline` generates up to 64 (test_harness.py's Hugging Face
model has a 48-token window)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import subprocess
import sys

import jax
import pytest

lm_eval = pytest.importorskip('lm_eval')

from flaxllm import models as M  # noqa: E402
from flaxllm.evaluation.tasks import TASKS_DIR  # noqa: E402
from flaxllm.interop import native  # noqa: E402
from flaxllm.train import main as main_lib  # noqa: E402

METRICS = {'flaxllm_stdlib_docname': ('acc,none', 'acc_norm,none'),
           'flaxllm_stdlib_nextline': ('exact_match,none',),
           'flaxllm_stdlib_ppl': ('word_perplexity,none', 'byte_perplexity,none',
                                  'bits_per_byte,none')}
LIMIT = 2


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory):
  cfg = M.presets.get('tiny_llama').replace(vocab_size=264, max_seq_len=160)
  path = tmp_path_factory.mktemp('eval_cli') / 'model'
  native.save_flaxllm(cfg, M.init_params(M.build(cfg), jax.random.key(0)), str(path))
  (path / 'tokenizer.json').write_text(json.dumps({'kind': 'bytes'}))
  return str(path)


@pytest.fixture(scope='module')
def evaluated(model_dir, tmp_path_factory):
  """One `flaxllm eval` of the tag covering the three shipped tasks, sharded, from another working
  directory (the tasks find their data next to their YAML): (exit code, stdout, output path)."""
  out_dir = tmp_path_factory.mktemp('eval_out')
  output = out_dir / 'results.json'
  stdout, cwd = io.StringIO(), os.getcwd()
  os.chdir(out_dir)
  try:
    with contextlib.redirect_stdout(stdout):
      code = main_lib.eval_main([f'--model={model_dir}', '--tasks=flaxllm_stdlib',
                                 f'--limit={LIMIT}', '--num-fewshot=1', '--batch-size=8',
                                 '--mesh=data:2,fsdp:-1',   # sharded over the 8 devices
                                 f'--output={output}', '--log-samples'])
  finally:
    os.chdir(cwd)
  return code, stdout.getvalue(), output


def test_each_shipped_task_runs_and_writes_its_metrics(evaluated):
  code, stdout, output = evaluated
  assert code == 0
  results = json.loads(output.read_text())['results']
  for task, metrics in METRICS.items():
    assert task in stdout                          # lm-eval's table
    for metric in metrics:
      assert math.isfinite(results[task][metric]), (task, metric)
  assert 0 <= results['flaxllm_stdlib_docname']['acc,none'] <= 1
  assert results['flaxllm_stdlib_ppl']['byte_perplexity,none'] > 1


def test_log_samples_writes_one_record_per_document(evaluated):
  _, _, output = evaluated
  for task in METRICS:
    path = output.parent / f'results_samples_{task}.jsonl'
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == LIMIT
    assert all({'doc', 'arguments', 'resps', 'target'} <= set(r) for r in records)
  nextline = json.loads((output.parent / 'results_samples_flaxllm_stdlib_nextline.jsonl')
                        .read_text().splitlines()[0])
  prompt = nextline['arguments'][0][0]
  assert prompt.endswith(nextline['doc']['context']) and '\n\n' in prompt   # one shot before it


def _error(capsys, argv) -> str:
  assert main_lib.eval_main(argv) == 1
  captured = capsys.readouterr()
  lines = captured.err.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in captured.err, captured.err
  return lines[0]


def test_an_unknown_task_lists_flaxllm_tasks(model_dir, capsys):
  line = _error(capsys, [f'--model={model_dir}', '--tasks=flaxllm_stdlib_ppl,no_such_task'])
  assert line.startswith("error: unknown task 'no_such_task'; the local tasks are ")
  for name in (*METRICS, 'flaxllm_stdlib'):
    assert name in line
  assert "lm-eval's catalogue has" in line and line.endswith('.')


def test_a_missing_model_dir_is_one_sentence(tmp_path, capsys):
  line = _error(capsys, [f'--model={tmp_path / "none"}', '--tasks=flaxllm_stdlib'])
  assert line.startswith(f"error: --model='{tmp_path / 'none'}' does not exist;")


def test_more_shots_than_few_shot_documents(model_dir, capsys):
  line = _error(capsys, [f'--model={model_dir}', '--tasks=flaxllm_stdlib_docname',
                         '--num-fewshot=51'])
  assert line == ('error: --num-fewshot=51 is more than the 50 few-shot documents of task '
                  'flaxllm_stdlib_docname; use at most 50.')


def test_a_bad_mesh_is_one_sentence(model_dir, capsys):
  line = _error(capsys, [f'--model={model_dir}', '--tasks=flaxllm_stdlib', '--mesh=fsdp:3'])
  assert line.startswith('error: ') and 'mesh' in line and line.endswith('.')


def test_harness_flags_need_tasks(model_dir, capsys):
  line = _error(capsys, [f'--model={model_dir}'])
  assert line.startswith('error: --model needs --tasks')


def test_the_shipped_data_is_small_and_split():
  for task in METRICS:
    path = os.path.join(TASKS_DIR, 'data', task.replace('flaxllm_', '') + '.jsonl')
    assert os.path.getsize(path) < 200_000
    splits = [json.loads(line)['split'] for line in open(path, encoding='utf-8')]
    assert 200 <= splits.count('test') <= 500
    assert splits.count('train') >= (0 if task.endswith('ppl') else 50)


def test_cli_startup_does_not_import_lm_eval():
  code = ('import sys, flaxllm.cli, flaxllm.train.main; '
          "print(sorted(m for m in sys.modules if m.startswith(('lm_eval', 'flaxllm.evaluation'))))")
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'
