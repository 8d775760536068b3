"""The run directory and model directories: the one owner of their layout.

A run directory (`flaxllm train --workdir=W`):

    W/config.json            the validated experiment config (CONFIG_FILE)
    W/tokenizer.model        the run's sentencepiece model (TOKENIZER_FILE), or
    W/tokenizer.json         {'kind': 'bytes', ...}: which tokenizer the run uses (TOKENIZER_INFO)
    W/source_tokenizer.*     the same for the source side of a sequence-to-sequence run with
                             separate vocabularies (stem SOURCE_TOKENIZER)
    W/checkpoints/<step>/    orbax: `state` (the TrainState) + `data` (iterator state)
    W/checkpoints_corrupt/   checkpoints that could not be read, moved aside, never deleted
    W/metrics.jsonl, W/loss_curve.png, W/wandb_id.txt     (flaxllm.train.metrics)
    W/model/                 the exported model: a flaxllm model directory + tokenizer
    W/adapter/               a LoRA run's adapter in Hugging Face PEFT format
    W/.flaxllm_run           the marker: this directory is a flaxllm run (MARKER_FILE)
    W/.flaxllm.lock          the lock of the one process writing the run (WorkdirLock)
    W/point.json, W/train.log    a sweep point's status and log (flaxllm.sweeps)

A flaxllm model directory (`flaxllm convert --to=D`, or W/model): model_config.json + params/
(`flaxllm.interop.native`), tokenizer.model if any. A Hugging Face directory: config.json with
`model_type` + safetensors (`flaxllm.interop.hf`).

    source = model_source(path, what='init_from')   # any of the three, read without arrays
    params = load_params(path, abstract_params)     # placed like `abstract` (with shardings)

`init_from`, distillation teachers, `flaxllm generate` and `flaxllm eval` all load through here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
import zlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flaxllm import models
from flaxllm.data import tokenizer as tokenizer_lib
from flaxllm.interop import hf, native
from flaxllm.interop import peft as peft_io
from flaxllm.models.config import ConfigError, ModelConfig
from flaxllm.peft import lora

log = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
# File stems of the run's tokenizer and of a seq2seq run's source-side tokenizer.
TOKENIZER, SOURCE_TOKENIZER = native.TOKENIZER_STEMS
TOKENIZER_FILE = f'{TOKENIZER}.model'
TOKENIZER_INFO = f'{TOKENIZER}.json'
CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
METRICS_FILE = 'metrics.jsonl'
LOSS_CURVE = 'loss_curve.png'
WANDB_ID_FILE = 'wandb_id.txt'
MODEL_DIR = 'model'
ADAPTER_DIR = 'adapter'
MARKER_FILE = '.flaxllm_run'
LOCK_FILE = '.flaxllm.lock'
SWEEP_POINT_FILE = 'point.json'
SWEEP_LOG_FILE = 'train.log'
CHECKSUM_FILE = 'flaxllm_checksums.json'   # in each checkpoint step directory
MODEL_KEY = 'model'   # the model's part of a train state's (objective-namespaced) params
# Everything flaxllm writes into a workdir (a workdir holding anything else is not a run).
RUN_FILES = frozenset({
    CONFIG_FILE, *native.TOKENIZER_FILES,
    CHECKPOINT_DIR, CORRUPT_DIR, METRICS_FILE, 'metrics.discarded.jsonl', LOSS_CURVE,
    WANDB_ID_FILE, 'wandb', MODEL_DIR, ADAPTER_DIR, MARKER_FILE, LOCK_FILE, SWEEP_POINT_FILE,
    SWEEP_LOG_FILE})

KINDS = ('workdir', 'flaxllm_model', 'hf')


class RunDirError(ConfigError):
  """A run or model directory that cannot be used; the message names the setting that points
  at it and the fix."""


def write_atomic(path: str, data: bytes | str):
  """Writes `data` to `path` through a temporary file and a rename (never half a file)."""
  mode = 'wb' if isinstance(data, bytes) else 'w'
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, mode) as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  """The JSON object in `path`; RunDirError naming the file if it is not one."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunDirError(f'{path} is not valid JSON ({e}); restore the file, or move it away if '
                      'flaxllm should not read it.') from None
  if not isinstance(value, dict):
    raise RunDirError(f'{path} holds a JSON {type(value).__name__}, not an object; restore the '
                      'file, or move it away if flaxllm should not read it.')
  return value


# ----------------------------------------------------------------------------- the workdir

def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks that it is writable and that it is a flaxllm run (empty, or
  holding only what flaxllm writes); returns its absolute path. Marks it as a run."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise RunDirError(f'workdir {workdir} is not writable ({e.strerror or e}); choose a '
                      'writable --workdir.') from e
  check_is_run(workdir)
  marker = os.path.join(workdir, MARKER_FILE)
  if jax.process_index() == 0 and not os.path.exists(marker):
    write_atomic(marker, json.dumps({'flaxllm_run': 1}) + '\n')
  return workdir


def check_is_run(workdir: str):
  """RunDirError unless `workdir` is empty, marked as a flaxllm run, or holds only files that
  flaxllm writes (a run of an earlier version, a sweep point made ready) with a flaxllm
  config.json: a training run never writes into another program's directory."""
  if os.path.exists(os.path.join(workdir, MARKER_FILE)):
    return
  foreign = sorted(n for n in os.listdir(workdir) if n not in RUN_FILES and
                   not n.startswith(('.write_test', f'.{MODEL_DIR}.flaxllm-')))
  stored = os.path.join(workdir, CONFIG_FILE)
  if not foreign and os.path.exists(stored):
    try:
      ours = {'model', 'optim', 'data'} <= set(read_json(stored))
    except (OSError, ValueError):
      ours = False
    foreign = [] if ours else [CONFIG_FILE]
  if foreign:
    raise RunDirError(f'--workdir {workdir} holds files that are not a flaxllm run (e.g. '
                      f'{foreign[0]}); training would overwrite them, so choose an empty or '
                      'new --workdir.')


class WorkdirLock:
  """One writer per workdir: `<workdir>/.flaxllm.lock`, created exclusively, names its holder
  (host, pid, process start, time); a heartbeat refreshes it every HEARTBEAT_S seconds.

  A second writer is refused with one sentence naming the holder. A lock left by a dead holder
  is taken over: on the same host when its pid no longer runs (or now belongs to a process
  started later: a reused pid), on another host when its heartbeat is older than STALE_S
  seconds. Read-only commands (eval, generate) take no lock; a multi-process run takes one,
  on process 0 (the trainer agrees on the outcome across processes)."""
  HEARTBEAT_S = 10.0
  STALE_S = 120.0

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.info = None
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()
    return False

  def acquire(self):
    for _ in range(5):
      info = {'host': socket.gethostname(), 'pid': os.getpid(), 'started': _process_start(
          os.getpid()), 'time': time.time(), 'token': uuid.uuid4().hex}
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = lock_holder(self.workdir)
        if holder is not None:
          since = time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('time', 0)))
          raise RunDirError(
              f'{self.workdir} is in use by another flaxllm process (pid '
              f'{holder.get("pid", "?")} on {holder.get("host", "?")}, since {since}); wait for '
              'it to finish or stop it, or use another --workdir.') from None
        self._take_over()
        continue
      with os.fdopen(fd, 'w') as f:
        json.dump(info, f)
      self.info = info
      self._thread = threading.Thread(target=self._heartbeat, daemon=True)
      self._thread.start()
      return
    raise RunDirError(f'could not lock {self.workdir} (other processes keep taking its lock); '
                      'make sure one flaxllm process trains in it, then run again.')

  def _take_over(self):
    """Moves a dead holder's lock out of the way (atomic rename: one of several racing takers
    wins; a lock that became live meanwhile is put back)."""
    stale = f'{self.path}.stale-{uuid.uuid4().hex}'
    try:
      before = _read_lock(self.path)
      os.rename(self.path, stale)
    except FileNotFoundError:
      return
    moved = _read_lock(stale)
    if moved is not None and before is not None and moved.get('token') != before.get('token'):
      with contextlib.suppress(FileExistsError):  # a fresh lock taken meanwhile: put it back
        os.link(stale, self.path)
    log.warning('Took over the lock of %s left by pid %s on %s (no longer running).',
                self.workdir, (moved or {}).get('pid'), (moved or {}).get('host'))
    os.remove(stale)

  def _heartbeat(self):
    while not self._stop.wait(self.HEARTBEAT_S):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self):
    if self.info is None:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    held = _read_lock(self.path)
    if held is not None and held.get('token') == self.info['token']:
      os.remove(self.path)
    self.info = None


def lock_holder(workdir: str) -> Optional[dict]:
  """The live holder of `workdir`'s lock ({'host', 'pid', 'started', 'time'}), or None when
  it is unlocked or its holder is gone."""
  path = os.path.join(workdir, LOCK_FILE)
  info = _read_lock(path)
  if info is None:
    return None
  if info.get('host') == socket.gethostname():
    pid = info.get('pid')
    alive = isinstance(pid, int) and _process_start(pid) is not None
    if alive and info.get('started') is not None:
      alive = _process_start(pid) == info['started']   # not a reused pid
    return info if alive else None
  try:
    fresh = time.time() - os.path.getmtime(path) < WorkdirLock.STALE_S
  except OSError:
    return None
  return info if fresh else None


def _read_lock(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      info = json.load(f)
    return info if isinstance(info, dict) else {}
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}   # being written, or damaged: a holder we cannot name, treated as stale


def _process_start(pid: int) -> Optional[str]:
  """When process `pid` started (from /proc; elsewhere its existence), or None if it does not
  run."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except FileNotFoundError:
    return None
  except OSError:
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return None
    except PermissionError:
      pass
    return 'unknown'


def save_config_json(workdir: str, text: str):
  write_atomic(os.path.join(workdir, CONFIG_FILE), text)


def run_tokenizer(workdir: str, tokenizer_cfg, corpus, reuse: bool = True,
                  stem: str = TOKENIZER) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer `stem`: with `reuse`, the copy in `workdir` if there is one; else
  built from `tokenizer_cfg` (sentencepiece models are trained on `corpus`, a data config or
  texts, or loaded from tokenizer.model_path) and copied into `workdir` so that eval and
  generation use the same."""
  if reuse:
    found = load_tokenizer(workdir, stem)
    if found is not None:
      return found
  tokenizer = tokenizer_lib.get_tokenizer(tokenizer_cfg, corpus=corpus)
  path = os.path.join(workdir, f'{stem}.model')
  info = {'kind': tokenizer_cfg.kind, 'vocab_size': tokenizer.vocab_size,
          'bos_id': tokenizer.bos_id, 'eos_id': tokenizer.eos_id, 'pad_id': tokenizer.pad_id}
  if isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
    write_atomic(path, tokenizer.model_proto)
    info['source'] = tokenizer.path
    tokenizer = tokenizer_lib.SentencePieceTokenizer.load(path)
  elif os.path.exists(path):  # a tokenizer of an earlier attempt without checkpoints
    os.remove(path)
  write_atomic(os.path.join(workdir, f'{stem}.json'), json.dumps(info, indent=2) + '\n')
  return tokenizer


def load_tokenizer(path: str, stem: str = TOKENIZER) -> Optional[tokenizer_lib.Tokenizer]:
  """The tokenizer `stem` stored in a workdir or model directory (<stem>.model, or a bytes
  tokenizer recorded in <stem>.json), or None."""
  spm = os.path.join(path, f'{stem}.model')
  if os.path.exists(spm):
    return tokenizer_lib.SentencePieceTokenizer.load(spm)
  if _tokenizer_info_kind(path, stem) == 'bytes':
    return tokenizer_lib.ByteTokenizer()
  return None


HF_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json')


def load_model_tokenizer(path: str, what: str = '--model') -> Any:
  """The tokenizer stored in the model directory or workdir `path`: flaxllm's (sentencepiece
  or bytes, see `load_tokenizer`) or a Hugging Face one (tokenizer.json / tokenizer_config.json,
  loaded with `transformers.AutoTokenizer`); RunDirError naming `what` if there is none."""
  tok = load_tokenizer(path)
  if tok is not None:
    return tok
  if any(os.path.exists(os.path.join(path, f)) for f in HF_TOKENIZER_FILES):
    import transformers  # pylint: disable=import-outside-toplevel -- heavy, only for HF tokenizers
    try:
      return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
      raise RunDirError(f'{what}={path!r} holds a Hugging Face tokenizer that cannot be loaded '
                        f'({str(e).splitlines()[0]}); restore its tokenizer files.') from None
  raise RunDirError(f'{what}={path!r} holds no tokenizer (tokenizer.model, a flaxllm '
                    'tokenizer.json or a Hugging Face tokenizer.json); copy the tokenizer the '
                    'model was trained with into it.')


def _tokenizer_info_kind(path: str, stem: str = TOKENIZER) -> Optional[str]:
  info = os.path.join(path, f'{stem}.json')
  if not os.path.exists(info):
    return None
  try:
    return read_json(info).get('kind')
  except (OSError, ValueError, AttributeError):
    return None  # e.g. a Hugging Face tokenizer.json (another format)


def tokenizer_fingerprint(path: str) -> Optional[tuple]:
  """('sentencepiece', sha256) | ('bytes',) of the tokenizer stored in `path`, or None."""
  spm = os.path.join(path, TOKENIZER_FILE)
  if os.path.exists(spm):
    with open(spm, 'rb') as f:
      return ('sentencepiece', hashlib.sha256(f.read()).hexdigest())
  return ('bytes',) if _tokenizer_info_kind(path) == 'bytes' else None


def export_model(workdir: str, model_cfg, params, tokenizer_source: bool = True) -> str:
  """`<workdir>/model/`: the final params in the `flaxllm convert` layout plus the tokenizer
  files, for `flaxllm generate --model=<workdir>/model`. Every process calls it (each writes
  its shards); the one with `tokenizer_source` copies the tokenizer."""
  path = os.path.join(workdir, MODEL_DIR)
  native.save_flaxllm(model_cfg, params, path, overwrite=True)   # the run's own export
  for name in native.TOKENIZER_FILES:
    src = os.path.join(workdir, name)
    if tokenizer_source and os.path.exists(src):
      with open(src, 'rb') as f:
        write_atomic(os.path.join(path, name), f.read())
  return path


def has_exported_model(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, MODEL_DIR, native.CONFIG_NAME))


# ----------------------------------------------------------------------------- checkpoints

class Checkpoints:
  """Save / restore (state, data iterator state) pairs of one workdir.

  Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes
  to a temporary directory and renames it when complete, so a crash mid-save leaves the
  previous checkpoints untouched. Once a save is complete, a CRC32 of every file goes into its
  `flaxllm_checksums.json`. Restoring tells three cases apart:
    * a checkpoint of another structure (model, objective, fine-tuning method): one-sentence
      RunDirError, nothing moved;
    * a damaged one (a file that does not match its checksum, or NaN/inf in the state): moved
      to `<workdir>/checkpoints_corrupt/` (never deleted; named in the output) and the
      previous checkpoint is used;
    * one that cannot be read though it is intact or cannot be verified (a transient I/O
      error): retried, then a one-sentence RunDirError; nothing moved.
  With `read_only` (eval, generate, another process looking in) nothing is ever written,
  cleaned up or moved.
  """
  READ_ATTEMPTS = 3

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save, read_only=read_only)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': ocp.JsonCheckpointHandler()})
    self._pending = None   # the step of a save that may still be in flight

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict) -> None:
    """Starts an asynchronous save of `state` and `data_state` at `step` (a no-op if a
    checkpoint of this step exists); the previous save is completed and checksummed first."""
    if step in self.manager.all_steps():
      return
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      data=ocp.args.JsonSave(data_state)),
                        force=True)
    except Exception as e:  # pylint: disable=broad-except -- storage errors of many types
      raise self._save_failed(step, e) from None
    self._pending = step

  def wait(self) -> None:
    """Completes a save in flight and records its checksums (a failed save: RunDirError)."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except -- storage errors of many types
      raise self._save_failed(step, e) from None
    if jax.process_index() == 0:
      directory = os.path.join(self.directory, str(step))
      write_atomic(os.path.join(directory, CHECKSUM_FILE), json.dumps(_checksums(directory)))

  def _save_failed(self, step: int, error: Exception) -> RunDirError:
    done = [s for s in self.manager.all_steps() if s != step]
    safe = f'step {max(done)}' if done else 'none yet'
    cause = ('no space left on device' if 'No space left on device' in str(error)
             else _first_line(error))
    return RunDirError(f'saving checkpoint {step} in {self.directory} failed ({cause}); the '
                       f'newest complete checkpoint is {safe}; free disk space (or fix the '
                       'storage) and run the same command to resume.')

  def check_structure(self, step: int, abstract_state: Any):
    """RunDirError when checkpoint `step` holds another tree than `abstract_state` (names,
    shapes and dtypes), read from its metadata only; an unreadable metadata is left to
    `restore`."""
    try:
      stored = self.manager.item_metadata(step)['state']
    except Exception:  # pylint: disable=broad-except -- unreadable: see restore_latest
      return
    stored = getattr(stored, 'tree', stored)
    if not stored:
      return
    mine, theirs = _shape_signature(abstract_state), _shape_signature(stored)
    if mine != theirs:
      raise RunDirError(
          f'checkpoint {step} in {self.directory} holds a different train state than this run '
          f'({_first_difference(mine, theirs)}): another model, objective or fine-tuning '
          'method, or an older flaxllm; resume with the settings it was trained with, or use '
          'a new --workdir.')

  def damage(self, step: int) -> Optional[str]:
    """Why checkpoint `step` is damaged (a file missing or not matching its recorded
    checksum), or None when it is intact or was saved without checksums."""
    directory = os.path.join(self.directory, str(step))
    path = os.path.join(directory, CHECKSUM_FILE)
    if not os.path.exists(path):
      return None
    try:
      recorded = read_json(path)
    except (OSError, ValueError):
      return f'its {CHECKSUM_FILE} is unreadable'
    actual = _checksums(directory)
    for name, crc in sorted(recorded.items()):
      if name not in actual:
        return f'{name} is missing'
      if actual[name] != crc:
        return f'{name} does not match its checksum'
    return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`; `abstract_state` gives shapes, dtypes and shardings. A
    checkpoint that does not fit, is damaged or cannot be read is a one-sentence RunDirError
    (nothing moved)."""
    self.check_structure(step, abstract_state)
    problem = self.damage(step)
    if problem:
      raise RunDirError(f'checkpoint {step} in {self.directory} is damaged ({problem}); use '
                        'another step.')
    return self._read(step, abstract_state)

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    for attempt in range(self.READ_ATTEMPTS):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        return out.state, out.data
      except Exception as e:  # pylint: disable=broad-except -- orbax/tensorstore raise many types
        error = e
        time.sleep(0.5 * (attempt + 1))
    verified = os.path.exists(os.path.join(self.directory, str(step), CHECKSUM_FILE))
    files = ('match their checksums' if verified else
             'cannot be verified (it was saved without checksums)')
    raise RunDirError(
        f'checkpoint {step} in {self.directory} could not be read after {self.READ_ATTEMPTS} '
        f'attempts ({_first_line(error)}); its files {files}, so nothing was moved: check the '
        'storage and run again, or move that checkpoint out of checkpoints/ yourself to resume '
        'from the previous one.')

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
    """(step, state, data_state) of the newest usable checkpoint, or None if there is none:
    damaged checkpoints are set aside (see the class docstring) and the next older one tried."""
    for step in reversed(self.steps()):
      self.check_structure(step, abstract_state)
      problem = self.damage(step)
      if problem is None:
        state, data_state = self._read(step, abstract_state)
        if bool(all_finite(state)):
          return step, state, data_state
        problem = 'NaN or inf in its state'
      self._set_aside(step, problem)
    return None

  def _set_aside(self, step: int, problem: str):
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.workdir, CORRUPT_DIR, f'{step}-{time.strftime("%Y%m%d-%H%M%S")}')
    if jax.process_index() == 0 and os.path.exists(src):
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.move(src, dst)
    self.manager.reload()
    message = (f'Checkpoint {step} in {self.directory} cannot be restored: it is damaged '
               f'({problem}); moved it to {dst} (kept, not deleted) and falling back to the '
               'previous checkpoint.')
    log.warning(message)
    print(message, flush=True)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


@jax.jit
def all_finite(tree) -> jax.Array:
  """Whether every float in `tree` is finite (one device-side reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _checksums(directory: str) -> dict[str, int]:
  """{relative path: CRC32} of every file under a checkpoint step directory."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      if name == CHECKSUM_FILE:
        continue
      path = os.path.join(root, name)
      crc = 0
      with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
          crc = zlib.crc32(chunk, crc)
      out[os.path.relpath(path, directory)] = crc
  return out


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return (text.splitlines()[0][:200] if text else '') or type(error).__name__


def _shape_signature(tree) -> dict:
  """{'/'-joined path: (shape, dtype)} of a tree of arrays / ShapeDtypeStructs / orbax
  metadata."""
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and not isinstance(x, dict))[0]
  out = {}
  for path, leaf in flat:
    key = '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k))))
                   for k in path)
    out[key] = (tuple(getattr(leaf, 'shape', None) or ()), str(getattr(leaf, 'dtype', '')))
  return out


def _first_difference(mine: dict, theirs: dict) -> str:
  for key in sorted(set(mine) | set(theirs), key=lambda k: (not k.startswith('params'), k)):
    if key not in theirs:
      return f'it has no {key}'
    if key not in mine:
      return f'it has {key}, which this run does not'
    if mine[key] != theirs[key]:
      return f'{key} is {theirs[key]} there, {mine[key]} here'
  return 'same names and shapes'


# ----------------------------------------------------------------------------- model sources

@dataclasses.dataclass(frozen=True)
class ModelSource:
  """A model to load, resolved without reading any array."""
  path: str
  kind: str                    # one of KINDS
  model_cfg: ModelConfig
  tokenizer: Optional[tuple]   # tokenizer_fingerprint of its directory (None: unknown)


def model_source(path: str, *, what: str = '--model', dtype: str = '') -> ModelSource:
  """The ModelSource of `path`: a flaxllm workdir (config.json with a `model` section; its
  newest checkpoint), a flaxllm model directory or a Hugging Face directory. `what` names the
  setting in error messages; `dtype` overrides the model's compute dtype."""
  if not path:
    raise RunDirError(f'{what} is empty; point it at a flaxllm workdir or model directory.')
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise RunDirError(f'{what}={path!r} does not exist; train it first or point {what} at a '
                      'flaxllm workdir, a flaxllm model directory or a Hugging Face directory.')
  overrides = {'dtype': dtype} if dtype else {}
  cfg_json = os.path.join(path, CONFIG_FILE)
  stored = read_json(cfg_json) if os.path.exists(cfg_json) else None
  if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)) or (stored and 'model' in stored):
    if stored is None:
      raise RunDirError(f'the workdir {what}={path!r} has no {CONFIG_FILE}; point {what} at a '
                        'complete flaxllm workdir.')
    if not checkpoint_steps(path):
      raise RunDirError(f'the workdir {what}={path!r} has no checkpoint; train it first (flaxllm '
                        f'train --workdir={path}) or point {what} at another run.')
    model = {**stored['model'], **overrides, 'remat': 'none'}
    return ModelSource(path, 'workdir', ModelConfig.from_dict(model), tokenizer_fingerprint(path))
  if os.path.exists(os.path.join(path, native.CONFIG_NAME)):
    model = {**read_json(os.path.join(path, native.CONFIG_NAME)), **overrides}
    return ModelSource(path, 'flaxllm_model', ModelConfig.from_dict(model),
                       tokenizer_fingerprint(path))
  if stored is not None:
    return ModelSource(path, 'hf', hf.config_from_hf(hf.read_hf_config(path), **overrides),
                       tokenizer_fingerprint(path))
  raise RunDirError(f'{what}={path!r} is neither a flaxllm workdir (config.json + '
                    'checkpoints/), a flaxllm model directory (model_config.json) nor a Hugging '
                    f'Face checkpoint (config.json); point {what} at one of those.')


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the finished checkpoints in `workdir` (from the directory names)."""
  directory = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def abstract_params(model_cfg: ModelConfig, sharding=None):
  """ShapeDtypeStructs of a model's params with `sharding`: one sharding for every leaf
  (default: the first device) or a tree of them (e.g. `axis_rules.param_shardings`)."""
  model = models.build(model_cfg)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.PRNGKey(0)))
  if sharding is None or isinstance(sharding, jax.sharding.Sharding):
    one = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    sharding = jax.tree.map(lambda _: one, shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      shapes, sharding)


def load_params(path: str, abstract: Any = None, *, what: str = '--model', dtype: str = '',
                step: Optional[int] = None):
  """The params of the model in `path` (see `model_source`), cast and placed like `abstract`
  (ShapeDtypeStructs with shardings; default: the source's own params on one device).

  A workdir gives the model params of its newest checkpoint (or, for a fine-tuning run whose
  checkpoints hold adapters, its exported `model/`). Shapes are compared before any array is
  read; a mismatch is one RunDirError naming `what`. `step` picks a workdir's checkpoint of that
  step instead of the newest (its model params must be in it: not an adapter-only run)."""
  source = model_source(path, what=what, dtype=dtype)
  if step is not None and (source.kind != 'workdir' or step not in checkpoint_steps(source.path)):
    raise RunDirError(f'{what}={source.path!r} has no checkpoint of step {step}; use one of '
                      f'{checkpoint_steps(source.path)} or leave the step out for the newest.')
  abstract = abstract_params(source.model_cfg) if abstract is None else abstract
  mismatch = RunDirError(f'the params in {what}={source.path!r} do not match the model config '
                         '(different shapes or names); use the same model settings as that run.')
  if source.kind == 'workdir':
    params = _workdir_params(source.path, abstract, mismatch, step)
  elif source.kind == 'flaxllm_model':
    params = native.load_flaxllm(source.path)[1]
  else:
    params = hf.load(source.path)[1]
  if _signature(params) != _signature(abstract):
    raise mismatch
  return jax.tree.map(lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding),
                      params, abstract)


def _signature(tree):
  return jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), tree)


def _workdir_params(path: str, abstract, mismatch: RunDirError, step: Optional[int] = None):
  """The model params of the checkpoint of `step` (default the newest) of a workdir, else (no
  step given) its exported model."""
  manager = ocp.CheckpointManager(
      os.path.join(path, CHECKPOINT_DIR),
      item_handlers={'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step() if step is None else step
    stored = manager.item_metadata(step)['state'].tree.get('params', {})
    stored = stored.get(MODEL_KEY) if isinstance(stored, dict) else None
    if stored is not None and _signature(stored) == _signature(abstract):
      target = {'params': {MODEL_KEY: abstract}}  # only the model params of that run's state
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)))
      return restored.state['params'][MODEL_KEY]
  finally:
    manager.close()
  exported = os.path.join(path, MODEL_DIR)
  if step == checkpoint_steps(path)[-1] and os.path.exists(
      os.path.join(exported, native.CONFIG_NAME)):   # e.g. a LoRA run's model
    return native.load_flaxllm(exported)[1]
  raise mismatch


def adapter_dir(path: str) -> str:
  """The PEFT adapter directory at `path`: the directory itself, or a flaxllm LoRA workdir's
  adapter/; a RunDirError (one sentence) when it is neither."""
  directory = os.path.abspath(os.path.expanduser(path))
  if not os.path.exists(os.path.join(directory, peft_io.ADAPTER_CONFIG)):
    directory = os.path.join(directory, ADAPTER_DIR)
  if not os.path.exists(os.path.join(directory, peft_io.ADAPTER_CONFIG)):
    raise RunDirError(f'--adapter={path!r} is neither a PEFT adapter directory '
                      f'({peft_io.ADAPTER_CONFIG}) nor a flaxllm LoRA workdir with '
                      f'{ADAPTER_DIR}/; point --adapter at one of those.')
  return directory


def merge_adapter(params, model_cfg: ModelConfig, path: str):
  """`params` with the LoRA adapter at `path` (`adapter_dir`) merged in: W0 + scale * A B."""
  return lora.merge(params, peft_io.load_adapter(adapter_dir(path), model_cfg))
