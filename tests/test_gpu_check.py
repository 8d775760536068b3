"""bench/gpu_check.sh (the one-command GPU check) on this CPU: its bash syntax, bench/train_mfu.py
in its tiny mode, and the log parsing / summary steps of bench/gpu_check.py. The whole dry run
(`bash bench/gpu_check.sh --dry-run`, about a minute) is not run here."""
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, 'bench')


def _gpu_check_module():
  spec = importlib.util.spec_from_file_location('gpu_check', os.path.join(BENCH, 'gpu_check.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_script_is_valid_bash():
  script = os.path.join(BENCH, 'gpu_check.sh')
  subprocess.run(['bash', '-n', script], check=True)
  assert os.access(script, os.X_OK)


def test_train_mfu_tiny_writes_its_result(tmp_path):
  out = tmp_path / 'train_mfu_cpu'
  proc = subprocess.run([sys.executable, os.path.join(BENCH, 'train_mfu.py'), '--tiny',
                         '--out', str(out)], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  r = json.loads((tmp_path / 'train_mfu_cpu.json').read_text())
  for key in ('device_kind', 'device_slug', 'backend', 'jax', 'date', 'command', 'model',
              'param_count', 'batch', 'seq_len', 'remat', 'step_time_s', 'tokens_per_s',
              'flops_per_token', 'peak_flops_table', 'peak_flops_table_source',
              'peak_flops_measured', 'mfu_table', 'mfu_measured', 'attention_kernels_in_step',
              'losses'):
    assert key in r, key
  assert r['tokens_per_s'] > 0 and r['step_time_s'] > 0 and r['param_count'] > 0
  assert r['tokens_per_s'] == r['batch'] * r['seq_len'] / r['step_time_s']
  assert r['mfu_measured'] > 0 and r['peak_flops_measured'] > 0
  assert r['peak_flops_table'] is None and r['mfu_table'] is None   # no datasheet for a CPU
  assert all(x == x for x in r['losses'])   # finite (not NaN)
  assert (tmp_path / 'train_mfu_cpu.md').read_text().startswith('# Train-step MFU on')


def test_datasheet_peaks_by_device_kind():
  sys.path.insert(0, BENCH)
  try:
    import train_mfu
  finally:
    sys.path.remove(BENCH)
  assert train_mfu.table_peak('NVIDIA H100 80GB HBM3')[0] == 989e12
  assert train_mfu.table_peak('NVIDIA H100 PCIe')[0] == 756e12
  assert train_mfu.table_peak('NVIDIA H200')[0] == 989e12
  assert train_mfu.table_peak('NVIDIA A100-SXM4-80GB')[0] == 312e12
  assert train_mfu.table_peak('cpu')[0] is None
  assert train_mfu.slug('NVIDIA H100 80GB HBM3') == 'nvidia_h100_80gb_hbm3'


def test_attention_rows_are_read_back_from_a_stopped_run():
  log = '\n'.join([
      'device: NVIDIA H100 80GB HBM3 (gpu), jax 0.10.2',
      'check vs xla (causal, fwd+bwd, smallest seq): pallas d=128: 0.0156',
      'check vs xla (causal, fwd+bwd, smallest seq): cudnn d=128: 0.0078',
      'd=128   seq=1024    full    fwd       pallas=312  cudnn=420  xla=150  '
      'pallas/cudnn=0.74x  pallas/xla=2.08x',
      'd=128   seq=16384   causal  fwd+bwd   pallas=280  cudnn=-  xla=-  '
      'cudnn: XlaRuntimeError: INTERNAL: cuDNN failed  xla: XlaRuntimeError: '
      'RESOURCE_EXHAUSTED: Out of memory',
  ])
  rows, checks, device = _gpu_check_module().rows_from_log(log, ('pallas', 'cudnn', 'xla'))
  assert device == dict(device_kind='NVIDIA H100 80GB HBM3', backend='gpu', jax='0.10.2')
  assert checks == {'pallas d=128': '0.0156', 'cudnn d=128': '0.0078'}
  assert rows[0]['pallas'] == 312 and rows[0]['pallas/cudnn'] == 0.74 and not rows[0]['causal']
  assert rows[1]['causal'] and rows[1]['mode'] == 'fwd+bwd' and rows[1]['cudnn'] is None
  assert rows[1]['cudnn_error'] == 'XlaRuntimeError: INTERNAL: cuDNN failed'
  assert rows[1]['xla_error'] == 'XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory'


def test_summary_marks_failed_parts_and_links_results(tmp_path):
  parts = tmp_path / 'parts.tsv'
  parts.write_text('preflight\tok\t0\t3\t45\tbackend gpu\n'
                   'kernel-tests\tFAILED\t1\t90\t150\t1 failed, 60 passed in 88s\n'
                   'attention-d64\tskipped\t-\t0\t-\tno time left\n')
  env = tmp_path / 'preflight.env'
  env.write_text('jax=0.10.2\nbackend=gpu\ndevice_kind=NVIDIA H200\nslug=nvidia_h200\n'
                 'gpu_kernels_interpreted=False\n')
  logs = tmp_path / 'logs'
  logs.mkdir()
  (logs / 'kernel_tests.log').write_text('FAILED tests/test_kernels.py::test_x\n')
  (tmp_path / 'train_mfu_nvidia_h200.md').write_text('x')
  summary = tmp_path / 'gpu_check_nvidia_h200.md'
  ok = _gpu_check_module().main([
      'summary', str(summary), '--parts', str(parts), '--env', str(env), '--nvidia-smi',
      str(tmp_path / 'absent.csv'), '--logs', str(logs), '--mfu',
      str(tmp_path / 'train_mfu_nvidia_h200'), '--attention',
      str(tmp_path / 'attention_nvidia_h200'), '--command', 'bash bench/gpu_check.sh',
      '--total', '300', '--budget', '460'])
  text = summary.read_text()
  assert ok == 1 and text.startswith('# GPU check on NVIDIA H200\n\nFAILED: 300 s')
  assert '| kernel-tests | **FAILED** (exit 1) | 90 s | 150 s | 1 failed, 60 passed' in text
  assert '[train_mfu_nvidia_h200.md](train_mfu_nvidia_h200.md)' in text
  assert 'attention_nvidia_h200.md (not written)' in text
  assert 'FAILED tests/test_kernels.py::test_x' in text   # the failed part's log tail
