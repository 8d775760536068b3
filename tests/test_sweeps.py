"""Sweeps and scaling laws: sweep expansion, the size knob and IsoFLOP layouts, bad input, the
runner's resume after `kill -9` (finished points are not redone, failed ones are recorded), the
W&B export and the agent's command line, and the Chinchilla fits on points drawn from the
published law (E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28).

Training runs use configs/default.py:size=tiny (2 layers, d_model 32, byte tokens, 40 files,
batch 8 x 32 tokens).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml

from flaxllm import config as config_lib
from flaxllm.models.config import ConfigError
from flaxllm.sweeps import fit as fit_lib
from flaxllm.sweeps import main as sweeps_main
from flaxllm.sweeps import runner as runner_lib
from flaxllm.sweeps import spec
from flaxllm.sweeps import wandb_export
from flaxllm.train import main as train_main
from flaxllm.train import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, 'configs', 'default.py') + ':size=tiny'


def _sweep_file(tmp_path, points: str, name='sweep.py') -> str:
  """A sweep file whose base config is the tiny default config; `points` is get_sweep's value."""
  path = tmp_path / name
  path.write_text(textwrap.dedent(f"""
      import importlib.util
      from flaxllm.sweeps.spec import product, zip_, chain

      _spec = importlib.util.spec_from_file_location('tiny_default', {TINY.split(':')[0]!r})
      _default = importlib.util.module_from_spec(_spec)
      _spec.loader.exec_module(_default)


      def get_config(arg=None):
        config = _default.get_config('size=tiny')
        config.sample.max_new_tokens = 0
        config.progress_bar = False
        return config


      def get_sweep(arg=None):
        return (
      """) + points + ')\n')
  return str(path)


# ----------------------------------------------------------------------------- definitions

def test_product_zip_chain_expand_in_order():
  grid = spec.product({'optim.lr': [1e-3, 3e-3]}, {'seed': [0, 1]})
  assert grid == [{'optim.lr': 1e-3, 'seed': 0}, {'optim.lr': 1e-3, 'seed': 1},
                  {'optim.lr': 3e-3, 'seed': 0}, {'optim.lr': 3e-3, 'seed': 1}]
  # A dict with several keys is the product of its axes; lists of points combine as they are.
  assert spec.product({'a': [1, 2], 'b': [3]}) == [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]
  assert spec.zip_({'model.num_layers': [2, 4]}, [{'model.d_model': 64}, {'model.d_model': 128}]) \
      == [{'model.num_layers': 2, 'model.d_model': 64}, {'model.num_layers': 4, 'model.d_model': 128}]
  assert spec.chain({'seed': [0]}, [{'seed': 1, '_name': 'x'}]) == [{'seed': 0},
                                                                   {'seed': 1, '_name': 'x'}]
  assert spec.overrides({'seed': 1, '_name': 'x', '_budget': 1.0}) == {'seed': 1}
  with pytest.raises(ConfigError, match="sweep key 'seed' is set by two factors"):
    spec.product({'seed': [0]}, {'seed': [1]})
  with pytest.raises(ConfigError, match='equal length'):
    spec.zip_({'a': [1, 2]}, {'b': [1]})
  with pytest.raises(ConfigError, match='must be a list of values'):
    spec.product({'a': 3})


def test_size_knob_grows_depth_and_width_to_the_target_count():
  model = config_lib.load_config(TINY).model
  shapes = [spec.shape_for_params(model, n) for n in (1e4, 1e5, 1e6, 1e7)]
  depths = [s['model.num_layers'] for s in shapes]
  widths = [s['model.d_model'] for s in shapes]
  assert depths == sorted(depths) and widths == sorted(widths)
  assert depths[-1] > depths[0] and widths[-1] > widths[0]
  for n, s in zip((1e4, 1e5, 1e6, 1e7), shapes):
    counts = spec.model_counts(config_lib.load_config(TINY), s)
    assert 0.6 < counts['params_non_embedding'] / n < 1.6, (n, s)
    assert s['model.d_model'] == 16 * s['model.num_heads']
    assert 12 <= s['model.d_model'] / s['model.num_layers'] <= 80   # width/depth ~ 32


def test_isoflop_gives_each_size_the_tokens_of_its_budget():
  config = config_lib.load_config(TINY)
  tokens_per_step = config.batch_size * config.seq_len
  points = spec.isoflop(config, budgets=(2e9, 6e9), sizes=(1e4, 3e4, 1e5), min_steps=20)
  assert [p['_name'] for p in points] == ['C2G_N10k', 'C2G_N30k', 'C6G_N10k', 'C6G_N30k',
                                          'C6G_N100k']
  for p in points:   # D = C / 6N, up to rounding to whole steps
    n = spec.model_counts(config, p)['params']
    steps = p['_budget'] / (6 * n * tokens_per_step)
    assert abs(p['total_steps'] - steps) <= 0.5
    assert p['schedule.warmup_steps'] == max(1, round(0.05 * p['total_steps']))
    assert p['eval_every'] == p['total_steps'] // 4
    config_lib.load_config(TINY, runner_lib.point_args(p))  # every point is a valid config
  # The largest size gets fewer than min_steps of the small budget: left out of that budget only.
  # A budget too small for the smallest size is an error.
  with pytest.raises(ConfigError, match=r'compute budget C=1e\+08 FLOPs gives the smallest model '
                                        r'\(N=10k\) only \d+ steps .* raise the budget'):
    spec.isoflop(config, budgets=(1e8,), sizes=(1e4,), min_steps=20)


def test_a_point_with_an_unknown_key_is_one_sentence_before_anything_runs(tmp_path):
  path = _sweep_file(tmp_path, "[{'seed': 1}, {'_name': 'oops', 'optim.lrr': 1e-3}]")
  with pytest.raises(ConfigError) as e:
    runner_lib.load_sweep(path)
  assert str(e.value) == ("sweep point oops: unknown config key 'optim.lrr'; remove it or fix the "
                          "name (did you mean 'optim.lr'?).")


# ----------------------------------------------------------------------------- runner

def _wait(predicate, timeout=240):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def test_killed_sweep_resumes_without_redoing_finished_points(tmp_path, monkeypatch):
  """Points: 'done' (finishes), 'bad' (fails at run time: its corpus does not exist), 'long'
  (killed mid-run with the sweep, by kill -9), with 2 workers. The second invocation skips 'done' and 'bad' and
  resumes 'long' from its checkpoint."""
  path = _sweep_file(tmp_path, textwrap.dedent('''[
      {'_name': 'done', 'total_steps': 6, 'eval_every': 3},
      {'_name': 'bad', 'total_steps': 6, 'data.source': 'text', 'data.path': '/no/such/corpus'},
      {'_name': 'long', 'total_steps': 600, 'ckpt_every': 25, 'eval_every': 300, 'log_every': 25},
  ]'''))
  sweep_dir = tmp_path / 'sweep'
  # The runs see one CPU device, as on a user's machine (not conftest's 8 fake ones).
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  # 2 workers: 'done' runs alone (it warms the caches), then 'bad' and 'long' start together.
  proc = subprocess.Popen([sys.executable, '-m', 'flaxllm.cli', 'sweep', f'--config={path}',
                           f'--workdir={sweep_dir}', '--workers=2'], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})
  long_ckpts = sweep_dir / 'long' / 'checkpoints'
  _wait(lambda: long_ckpts.exists() and any(d.isdigit() for d in os.listdir(long_ckpts))
        or proc.poll() is not None)
  proc.kill()   # SIGKILL: the sweep cannot clean up; its run gets SIGTERM from the kernel
  output = proc.communicate()[0]
  assert proc.returncode == -signal.SIGKILL, output
  events = [l.split(' log ')[0] for l in output.splitlines() if l.startswith('[')]
  assert events[:4] == ['[done] started (1/3),', events[1], '[bad] started (2/3),',
                        '[long] started (3/3),'], output
  assert events[1].startswith('[done] complete in'), output
  long_pid = runner_lib.read_point(str(sweep_dir / 'long'))['pid']
  _wait(lambda: not os.path.exists(f'/proc/{long_pid}') or
        open(f'/proc/{long_pid}/stat').read().split()[2] == 'Z')
  assert runner_lib.read_point(str(sweep_dir / 'long'))['status'] == 'running'
  done_metrics = os.stat(sweep_dir / 'done' / metrics_lib.METRICS_FILE).st_mtime_ns
  stopped_at = max(r['step'] for r in metrics_lib.read_metrics(str(sweep_dir / 'long')))
  assert 25 <= stopped_at < 600

  lines = []
  sweep = runner_lib.load_sweep(path)
  statuses = runner_lib.run_sweep(sweep, str(sweep_dir), echo=lines.append)
  assert [s['status'] for s in statuses] == ['complete', 'failed', 'complete']
  assert lines[:2] == ['[done] complete, skipped', '[bad] failed, skipped']
  assert os.stat(sweep_dir / 'done' / metrics_lib.METRICS_FILE).st_mtime_ns == done_metrics
  assert (sweep_dir / 'done' / runner_lib.LOG_FILE).read_text().count('\n$ ') == 1
  assert 'Resuming' in (sweep_dir / 'long' / runner_lib.LOG_FILE).read_text()
  assert statuses[2]['attempts'] == 2
  assert 'no/such/corpus' in statuses[1]['error'], statuses[1]['error']

  rows = runner_lib.read_results(str(sweep_dir))
  assert [r['name'] for r in rows] == ['done', 'long']
  long = rows[1]
  assert long['steps'] == 600
  assert long['tokens'] == 600 * config_lib.load_config(TINY).batch_size * 32
  assert long['params'] > long['params_non_embedding'] > 0
  assert long['flops_6nd'] == 6 * long['params'] * long['tokens']
  assert long['flops'] > 0 and long['best_val_loss'] <= long['val_loss']
  assert sweeps_main.table(rows).count('\n') == 3   # header, rule, two runs


# ----------------------------------------------------------------------------- W&B

def _agent_command(sweep_yaml: dict, run_id: str, values: dict) -> list[str]:
  """The command line `wandb agent` builds for one run (wandb_agent.Agent._command_run)."""
  from wandb.sdk.launch.sweeps import utils as sweep_utils  # pylint: disable=import-outside-toplevel
  args = sweep_utils.create_sweep_command_args(
      {'args': {k: {'value': v} for k, v in values.items()}})
  macros = {**args, 'env': ['/usr/bin/env'], 'interpreter': ['python'],
            'program': [sweep_yaml['program']]}
  command = []
  for chunk in sweep_utils.create_sweep_command(list(sweep_yaml['command'])):
    chunk = str(chunk)
    command += macros[chunk[2:-1]] if chunk.startswith('${') else [chunk]
  return command


def test_wandb_export_and_the_agents_command_line(tmp_path, monkeypatch):
  path = _sweep_file(tmp_path, "product({'optim.lr': [1e-3, 3e-3]}, {'model.mlp_dim': [64, 96]})")
  common = ['--config.total_steps=3', '--config.batch_size=8']   # 8: one row per fake device
  sweep = runner_lib.load_sweep(path, common)
  out = tmp_path / 'sweep.yaml'
  assert sweeps_main.sweep_main([f'--config={path}', f'--export-wandb={out}', '--method=bayes',
                                 f'--workdir={tmp_path}/agent', *common]) == 0
  data = yaml.safe_load(out.read_text())
  assert list(data) == ['name', 'project', 'program', 'method', 'metric', 'parameters', 'command']
  assert data['method'] == 'bayes' and data['metric'] == {'name': 'val_loss', 'goal': 'minimize'}
  assert data['parameters'] == {'config.optim.lr': {'values': [1e-3, 3e-3]},
                                'config.model.mlp_dim': {'values': [64, 96]}}
  assert data['command'] == ['${env}', '${interpreter}', '-m', 'flaxllm.cli', 'train',
                             f'--config={path}', f'--workdir={tmp_path}/agent/{{wandb_run_id}}',
                             '--config.wandb.group=agent', *common, '${args}']

  command = _agent_command(data, 'r0', {'config.optim.lr': 0.003, 'config.model.mlp_dim': 96})
  assert command[:4] == ['/usr/bin/env', 'python', '-m', 'flaxllm.cli']
  assert command[-2:] == ['--config.optim.lr=0.003', '--config.model.mlp_dim=96']
  spec_arg, workdir, overrides = train_main.parse_train_args(command[5:])
  config = train_main.config_for(spec_arg, workdir, overrides)
  assert (config.optim.lr, config.model.mlp_dim, config.total_steps) == (3e-3, 96, 3)
  assert config.wandb.group == 'agent'

  # The agent sets WANDB_RUN_ID / WANDB_SWEEP_ID: the run gets its own workdir and W&B id.
  monkeypatch.setenv('WANDB_RUN_ID', 'r0')
  monkeypatch.setenv('WANDB_SWEEP_ID', 's0')
  assert train_main.train_main(command[5:]) == 0
  assert (tmp_path / 'agent' / 'r0' / metrics_lib.WANDB_ID_FILE).read_text() == 'r0\n'
  assert max(r['step'] for r in metrics_lib.read_metrics(str(tmp_path / 'agent' / 'r0'))) == 3
  monkeypatch.delenv('WANDB_RUN_ID')
  with pytest.raises(ConfigError, match=r'contains \{wandb_run_id\} but \$WANDB_RUN_ID is not set'):
    train_main.resolve_workdir('runs/x/{wandb_run_id}')

  # Points whose keys move together (an IsoFLOP layout) are not a W&B grid: one sentence.
  zipped = _sweep_file(tmp_path, "zip_({'optim.lr': [1e-3, 3e-3]}, {'seed': [0, 1]})", 'zip.py')
  with pytest.raises(ConfigError, match="the sweep's 2 points are not every combination"):
    wandb_export.sweep_file(runner_lib.load_sweep(zipped), name='z', workdir_root='runs/z')
  with pytest.raises(ConfigError, match='is not a W&B sweep method'):
    wandb_export.sweep_file(sweep, name='x', workdir_root='runs/x', method='hyperband')

  # random/bayes take distributions from the sweep file's get_wandb_parameters, if it has one.
  with open(zipped, 'a') as f:
    f.write("def get_wandb_parameters(arg=None):\n  return {'config.optim.lr': {'distribution': "
            "'log_uniform_values', 'min': 1e-4, 'max': 1e-2}}\n")
  data = wandb_export.sweep_file(runner_lib.load_sweep(zipped), name='z', workdir_root='runs/z',
                                 method='random')
  assert data['parameters'] == {'config.optim.lr': {'distribution': 'log_uniform_values',
                                                    'min': 1e-4, 'max': 1e-2}}


def test_a_sweep_launches_on_a_tpu_vm_through_launch():
  """`launch/tpu_vm.py run -- flaxllm sweep ...` runs the sweep command in the synced tree."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  module_spec = importlib.util.spec_from_file_location(
      'tpu_vm', os.path.join(REPO, 'launch', 'tpu_vm.py'))
  tpu_vm = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(tpu_vm)
  sweep = ['flaxllm', 'sweep', '--config=experiments/scaling/sweep.py', '--workdir=runs/scaling']
  args = tpu_vm.parse(['run', '--name=run1', '--zone=us-west4-a', '--detach', '--', *sweep])
  (command,) = tpu_vm.plan(args)
  assert command[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'run1']
  remote = command[-1]
  assert remote.startswith('--command=nohup bash -c ') and ' '.join(sweep) in remote
  assert 'cd ~/flaxllm && flaxllm sweep' in remote


# ----------------------------------------------------------------------------- fits

LAW = fit_lib.LawFit(**fit_lib.CHINCHILLA)


def _chinchilla_points(noise: float, seed: int = 0):
  """An 8 x 8 grid of N in [1e7, 1e10] and D in [1e9, 1e12] (log-spaced), losses from the
  published law times exp(noise * standard normal)."""
  n, d = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e10, 8), np.geomspace(1e9, 1e12, 8)))
  rng = np.random.default_rng(seed)
  return n, d, LAW.loss(n, d) * np.exp(noise * rng.standard_normal(n.size))


def test_approach3_recovers_the_published_chinchilla_law():
  """Noise 0.3% on the loss (64 runs). Tolerances: E within 2%, alpha and beta within 0.02,
  A and B within 30% (they trade off against the exponents), a = beta/(alpha+beta) within
  0.02; without noise everything within 0.1%. The bootstrap 95% intervals contain the truth."""
  n, d, l = _chinchilla_points(0.0)
  exact = fit_lib.fit_law(n, d, l, bootstrap=0, starts=8)
  for key, true in fit_lib.CHINCHILLA.items():
    assert getattr(exact, key) == pytest.approx(true, rel=1e-3), key

  n, d, l = _chinchilla_points(0.003)
  law = fit_lib.fit_law(n, d, l, bootstrap=40, starts=16, target_flops=5.76e23)
  assert law.E == pytest.approx(1.69, rel=0.02)
  assert abs(law.alpha - 0.34) < 0.02 and abs(law.beta - 0.28) < 0.02
  assert law.A == pytest.approx(406.4, rel=0.3) and law.B == pytest.approx(410.7, rel=0.3)
  assert abs(law.a - 0.28 / 0.62) < 0.02
  for key in ('alpha', 'beta', 'E'):
    lo, hi = law.ci[key]
    assert lo <= fit_lib.CHINCHILLA[key] <= hi, (key, law.ci[key])
  assert law.ci['N_opt'][0] < law.optimal(5.76e23)[0] < law.ci['N_opt'][1]


def test_closed_form_optimum_matches_numerical_minimisation():
  for flops in (1e18, 5.76e23, 1e26):
    n_opt, d_opt = LAW.optimal(flops)
    n_num, d_num = fit_lib.numeric_optimum(LAW, flops)
    assert n_opt == pytest.approx(n_num, rel=1e-4) and d_opt == pytest.approx(d_num, rel=1e-4)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-9)
  # Gopher's budget: the published law puts the optimum near 40B parameters (paper, table 3).
  assert 3e10 < LAW.optimal(5.76e23)[0] < 5e10


def test_approach2_isoflop_parabolas_find_the_optimum_exponent():
  """IsoFLOP points sampled from the law (7 sizes around each budget's optimum, no noise): the
  fitted exponents are within 0.02 of beta/(alpha+beta) and alpha/(alpha+beta)."""
  budgets, n, d = [], [], []
  for c in (1e18, 1e19, 1e20, 1e21):
    centre = LAW.optimal(c)[0]
    for size in centre * np.geomspace(1 / 4, 4, 7):
      budgets.append(c)
      n.append(size)
      d.append(c / (6 * size))
  iso = fit_lib.fit_isoflop(budgets, n, d, LAW.loss(np.array(n), np.array(d)))
  assert abs(iso.a - LAW.a) < 0.02 and abs(iso.b - LAW.b) < 0.02
  assert iso.optimal(1e20)[0] == pytest.approx(LAW.optimal(1e20)[0], rel=0.1)
  assert iso.inside == [True] * 4

  # A budget whose sizes are all above its optimum: its vertex is an extrapolation, reported but
  # left out of the power law; with fewer than 2 budgets left it is one sentence.
  sizes = LAW.optimal(1e17)[0] * np.geomspace(4, 64, 5)
  more = (budgets + [1e17] * 5, n + list(sizes), d + list(1e17 / (6 * sizes)))
  iso2 = fit_lib.fit_isoflop(*more, LAW.loss(np.array(more[1]), np.array(more[2])))
  assert iso2.inside == [False, True, True, True, True] and iso2.a == pytest.approx(iso.a)
  two = [i for i, c in enumerate(more[0]) if c in (1e17, 1e18)]
  with pytest.raises(ConfigError, match=r'loss minimum inside the model sizes of at least 2 '
                                        r'budgets; at C = 1e\+17 it lies outside'):
    fit_lib.fit_isoflop(*([x[i] for i in two] for x in more),
                        LAW.loss(np.array(more[1])[two], np.array(more[2])[two]))


def test_too_few_points_to_fit_is_one_sentence():
  with pytest.raises(ConfigError, match=r'needs at least 6 finished runs .* found 3 runs '
                                        r'\(3 sizes, 3 token counts\); run more sweep points\.'):
    fit_lib.fit_law([1e6, 2e6, 3e6], [1e8, 2e8, 3e8], [3.0, 2.9, 2.8])
  with pytest.raises(ConfigError, match=r'at least 3 model sizes in each of at least 2 compute '
                                        r'budgets; found 1 budgets'):
    fit_lib.fit_isoflop([1e18] * 3, [1e6, 2e6, 3e6], [1e8, 2e8, 3e8], [3.0, 2.9, 3.1])


def test_fit_json_and_plots_from_results(tmp_path):
  """`fit_sweep` on rows as results.jsonl holds them (IsoFLOP points drawn from the law)."""
  rows = []
  for c in (1e18, 1e19, 1e20):
    for size in LAW.optimal(c)[0] * np.geomspace(1 / 4, 4, 4):
      tokens = c / (6 * size)
      rows.append({'name': f'{c:g}_{size:.0f}', 'budget': c, 'params': size,
                   'params_non_embedding': size * 0.9, 'tokens': tokens, 'flops_6nd': c,
                   'flops': c * 1.1, 'val_loss': float(LAW.loss(size, tokens)),
                   'best_val_loss': float(LAW.loss(size, tokens))})
  result = sweeps_main.fit_sweep(rows, bootstrap=5, starts=8, target_flops=1e21)
  text = sweeps_main.format_fit(result)
  assert 'alpha = 0.34' in text and 'Approach 2: IsoFLOP parabolas (3 budgets' in text
  from flaxllm.sweeps import plots  # pylint: disable=import-outside-toplevel
  paths = plots.plot_all(result, str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ['isoflop.png', 'law.png', 'optimal.png']
  assert all(open(p, 'rb').read(8) == b'\x89PNG\r\n\x1a\n' for p in paths)
  json.dumps(sweeps_main._json_ready(result))  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- not losing runs

def test_point_names_stay_inside_the_sweep_directory(tmp_path):
  sweep = runner_lib.load_sweep(_sweep_file(tmp_path, "[{'seed': 1, '_name': '..'}, "
                                                      "{'seed': 2, '_name': '.hidden'}]"))
  names = [p['_name'] for p in sweep.points]
  assert names == ['000', 'hidden']


def test_rerun_with_other_common_overrides_is_refused_and_live_points_left_alone(tmp_path):
  from flaxllm import rundir
  path = _sweep_file(tmp_path, "[{'seed': 1, '_name': 'busy'}]")
  sweep_dir = tmp_path / 'sweep'
  (sweep_dir / 'busy').mkdir(parents=True)
  (sweep_dir / runner_lib.SWEEP_FILE).write_text(json.dumps(
      {'spec': path, 'common': ['--config.total_steps=5'], 'points': []}))
  with pytest.raises(ConfigError, match=r"was run with the overrides \['--config.total_steps=5'\] "
                                        r'for every point, this one with \[\]; pass the same'):
    runner_lib.run_sweep(runner_lib.load_sweep(path), str(sweep_dir), echo=lambda s: None)
  lines = []
  with rundir.WorkdirLock(str(sweep_dir / 'busy')):   # its run (e.g. of a killed sweep) lives
    statuses = runner_lib.run_sweep(runner_lib.load_sweep(path, ['--config.total_steps=5']),
                                    str(sweep_dir), echo=lines.append)
  assert f'[busy] still running (pid {os.getpid()}), left alone' in lines
  assert statuses == [{'name': 'busy', 'status': 'pending'}]
  assert not (sweep_dir / 'busy' / runner_lib.LOG_FILE).exists()   # nothing started
