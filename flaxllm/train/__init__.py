"""Training: `train(config, workdir)` and the `flaxllm train` / `flaxllm eval` commands.

  config.py (flaxllm/)  experiment files, overrides, validation
  optim.py              optimizers and schedules by name, weight-decay mask by path regexes
  step.py               TrainState, loss, the jittable train/eval steps (grad accumulation)
  checkpoint.py         orbax checkpoints of (state, data iterator), fallback on corruption
  metrics.py            metrics.jsonl, W&B, progress bar, MFU peak, loss-curve PNG
  trainer.py            the linear trainer
  main.py               train_main / eval_main (command lines)
"""
from flaxllm.train.main import eval_main, evaluate_workdir, train_main


def train(config, workdir: str) -> dict:
  """See flaxllm.train.trainer.train (imported lazily: JAX is heavy)."""
  from flaxllm.train import trainer  # pylint: disable=import-outside-toplevel
  return trainer.train(config, workdir)


__all__ = ['train', 'train_main', 'eval_main', 'evaluate_workdir']
