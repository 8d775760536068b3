r"""Instruction tuning: the `make train` model fine-tuned on a small Alpaca-format set with
LoRA, QLoRA, freezing or full fine-tuning (results: experiments/sft_lora/README.md).

    flaxllm train --config=configs/default.py --workdir=runs/default      # the base (make train)
    python experiments/sft_lora/make_data.py --out runs/sft_lora/data.jsonl
    for m in lora qlora full freeze; do
      flaxllm train --config=experiments/sft_lora/config.py:method=$m --workdir=runs/sft_lora/$m \
          --config.wandb.mode=disabled
    done
    python experiments/sft_lora/report.py    # the validation loss on responses, per method

The loss (train and validation) is on response tokens only (data.format='alpaca'); the base's
tokenizer is reused; the base's params come from its newest checkpoint (`init_from`). Any
flaxllm workdir, `flaxllm convert` directory or Hugging Face LLaMA directory with the same
model settings works as `base=...` (set the model fields to match it).

Measured with a base stopped at step 106 (see the README).

Variants: method=lora|qlora|freeze|full, base=DIR (default runs/default), data=FILE
(default runs/sft_lora/data.jsonl), steps (60), rank (8), lr (0 = the method's default).
"""
import os

from flaxllm.config import load_file, parse_arg

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'configs',
                        'default.py')
ALPACA_SAMPLE = ('Below is an instruction that describes a task, paired with an input that '
                 'provides further context. Write a response that appropriately completes the '
                 'request.\n\n### Instruction:\nReverse the letters of the word.\n\n### Input:\n'
                 'module\n\n### Response:\n')


def get_config(arg=None):
  arg = parse_arg(arg, method='lora', base='runs/default', data='runs/sft_lora/data.jsonl',
                  steps=60, rank=8, lr=0.0)
  config = load_file(_DEFAULT)   # the base run's model, so init_from's params fit
  config.init_from = os.path.abspath(arg.base)   # orbax needs absolute checkpoint paths
  config.tokenizer.model_path = os.path.join(arg.base, 'tokenizer.model')
  config.data.source = 'jsonl'
  config.data.path = arg.data
  config.data.format = 'alpaca'
  config.data.val_fraction = 0.1
  config.data.packing = 'first_fit'    # whole examples per row where they fit
  config.seq_len = 112                 # one example per row (the longest is 106 tokens)

  ft = config.finetune
  ft.method = arg.method
  ft.rank = arg.rank
  ft.alpha = 2.0 * arg.rank
  ft.targets = ('all-linear',)
  if arg.method == 'freeze':             # the top two layers, the final norm and the head
    n = config.model.num_layers
    ft.train = (rf'layers_({n - 2}|{n - 1})/', 'final_norm/', 'lm_head/')
    config.model.scan_layers = False
  default_lr = {'full': 3e-4, 'freeze': 1e-3, 'lora': 2e-3, 'qlora': 2e-3}[arg.method]
  config.optim.lr = arg.lr or default_lr
  config.optim.weight_decay = 0.0
  config.schedule.warmup_steps = 10
  config.total_steps = arg.steps
  config.eval_every = 20
  config.eval_batches = 8
  config.ckpt_every = 60
  config.log_every = 5
  config.sample.prompt = ALPACA_SAMPLE
  config.sample.max_new_tokens = 12
  config.sample.top_k = 1                # greedy
  return config
