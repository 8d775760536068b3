"""Training: the trainer and its commands.

  step.py            TrainState and the jittable train/eval steps of a LossFn (grad accumulation)
  optim.py           optimizers and schedules by name (config.optim, config.schedule)
  metrics.py         metrics.jsonl, W&B, progress bar, MFU peak, loss-curve PNG (config.wandb)
  trainer.py         the linear trainer: `train(config, workdir)`; `build_programs`
  compile.py         `flaxllm compile`: the trainer's train step compiled ahead of time
  main.py            `flaxllm train` / `flaxllm eval`
  distill_data.py    `flaxllm distill-data`: teacher outputs for students, made once

What is trained and its loss come from flaxllm.objectives; the run directory (checkpoints,
tokenizer, exported model) is flaxllm.rundir; the config is flaxllm.config.
"""
