"""`flaxllm eval --tasks=...`: lm-evaluation-harness tasks on a flaxllm, Hugging Face or workdir
model through the `flaxllm` backend (`flaxllm.evaluation.harness`), with flaxllm's own tasks
(`flaxllm.evaluation.tasks`) and any `--include-path`. lm_eval is imported only when tasks run,
so the CLI starts without it; `flaxllm.train.main` parses the arguments.
"""
from __future__ import annotations

import json
import logging
import os

from flaxllm import rundir
from flaxllm.models.config import ConfigError
from flaxllm.parallel import mesh as mesh_lib


def shots_available(task) -> int:
  """How many few-shot examples lm-eval can draw for `task` (when it draws from the split it
  scores, it leaves the document itself out)."""
  docs = task.fewshot_docs()
  if docs is None:
    return 0
  count = len(docs) if hasattr(docs, '__len__') else sum(1 for _ in docs)
  fewshot_split = getattr(getattr(task, 'fewshot_cfg', None), 'split', None)
  same_split = fewshot_split is not None and fewshot_split == task.get_config('test_split')
  return max(count - 1, 0) if same_split else count


def run_tasks(args) -> int:
  """`flaxllm eval --tasks=...`: lm_eval.simple_evaluate on the flaxllm backend."""
  what, path = ('--model', args.model) if args.model else ('--workdir', args.workdir)
  rundir.model_source(path, what=what)   # a missing or unreadable directory: one sentence, now
  mesh = mesh_lib.parse_spec(args.mesh) if args.mesh else None   # a bad --mesh: now
  if args.log_samples and not args.output:
    raise ConfigError('--log-samples needs --output=FILE (the samples go next to it).')
  if args.num_fewshot is not None and args.num_fewshot < 0:
    raise ConfigError(f'--num-fewshot must be 0 or more, not {args.num_fewshot}.')
  for folder in args.include_path:
    if not os.path.isdir(folder):
      raise ConfigError(f'--include-path={folder!r} is not a directory of task YAML files.')
  try:
    import lm_eval  # pylint: disable=import-outside-toplevel -- heavy, optional: only with --tasks
    from lm_eval.utils import handle_non_serializable, make_table  # pylint: disable=import-outside-toplevel -- heavy, optional: only with --tasks
    from flaxllm.evaluation import harness  # pylint: disable=import-outside-toplevel -- heavy, optional: only with --tasks
    from flaxllm.evaluation import tasks as task_lib  # pylint: disable=import-outside-toplevel -- optional: only with --tasks
  except ModuleNotFoundError as e:
    if (e.name or '').split('.')[0] != 'lm_eval':
      raise
    raise ConfigError("--tasks needs lm-evaluation-harness: pip install 'lm-eval==0.4.13' (or "
                      "pip install -e '.[dev]').") from None
  if not os.environ.get('FLAXLLM_DEBUG'):
    logging.getLogger('lm_eval').setLevel(logging.ERROR)   # its per-task notices, not ours

  include = tuple(os.path.abspath(f) for f in args.include_path)
  manager = task_lib.task_manager(include)
  names = [t.strip() for t in args.tasks.split(',') if t.strip()]
  if not names:
    raise ConfigError('--tasks is empty; name at least one task, e.g. --tasks=flaxllm_stdlib.')
  unknown = [n for n in names if n not in manager.all_tasks
             and not (n.endswith('.yaml') and os.path.isfile(n))]
  if unknown:
    local = task_lib.local_tasks(manager, include)
    more = len(manager.all_tasks) - len(local)
    raise ConfigError(f'unknown task {unknown[0]!r}; the local tasks are {", ".join(local)} '
                      f"(and lm-eval's catalogue has {more} more: lm-eval ls tasks).")

  chosen, tasks = [], {}   # what simple_evaluate gets: groups whole, tags and tasks as tasks
  for name in names:
    try:
      loaded = manager.load([name])
    except (OSError, ValueError) as e:   # a catalogue dataset that is neither cached nor online
      raise ConfigError(f'task {name!r} could not load its data ({str(e).splitlines()[0]}); '
                        'catalogue tasks need their dataset in the local Hugging Face cache '
                        '(HF_DATASETS_OFFLINE=1).') from None
    groups = loaded.get('groups') or {}
    chosen += [groups[name]] if name in groups else list(loaded['tasks'].values())
    tasks.update(loaded['tasks'])
  for name, task in tasks.items():
    own = task.get_config('num_fewshot')
    shots = own if args.num_fewshot is None or own == 0 else args.num_fewshot
    if shots and shots > (available := shots_available(task)):
      asked = f'--num-fewshot={shots}' if args.num_fewshot is not None else f'num_fewshot={shots}'
      raise ConfigError(f'{asked} is more than the {available} few-shot documents of task '
                        f'{name}; use at most {available}.')

  kwargs = {} if args.batch_size is None else {'batch_size': args.batch_size}
  lm = harness.FlaxLM(pretrained=path, step=args.step, mesh=mesh, **kwargs)
  results = lm_eval.simple_evaluate(model=lm, tasks=chosen, num_fewshot=args.num_fewshot,
                                    limit=args.limit, task_manager=manager,
                                    log_samples=args.log_samples)
  samples = results.pop('samples', None)
  print(make_table(results))
  if results.get('groups'):
    print(make_table(results, 'groups'))
  if args.output:
    output = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, 'w', encoding='utf-8') as f:
      json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
    print(f'results: {output}')
    for task_name, records in (samples or {}).items():
      stem = os.path.splitext(output)[0]
      with open(f'{stem}_samples_{task_name}.jsonl', 'w', encoding='utf-8') as f:
        for record in records:
          f.write(json.dumps(record, default=handle_non_serializable, ensure_ascii=False) + '\n')
      print(f'samples of {task_name}: {stem}_samples_{task_name}.jsonl')
  return 0
