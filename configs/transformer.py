r"""The original Transformer (Vaswani et al. 2017) trained as a sequence-to-sequence model on a
parallel corpus generated from the Python standard library (no download).

    flaxllm train --config=configs/transformer.py --workdir=runs/transformer
    flaxllm generate --model=runs/transformer/model --source='get_config_value' --num-beams=4

The architecture is the paper's: an encoder and a decoder of post-norm blocks (LayerNorm,
ReLU MLP, biases), sinusoidal positions, one token embedding shared by encoder, decoder and
output head and scaled by sqrt(d_model), dropout, label smoothing 0.1, Adam (b2 = 0.98), and
validation by beam search (4 beams, length penalty 0.6) with exact match and sacreBLEU.

Variants (after the colon, comma-separated):
    size=tiny      d_model 64, 2 + 2 layers, byte vocabulary, task snake_to_camel
                   (`get_config_value` -> `GetConfigValue`), 1000 steps of batch 32: about a
                   minute on 2 CPU cores, >= 95% exact match (the CI test)
    size=small     d_model 256, 3 + 3 layers, 8 heads, task signature_to_doc (a function's
                   signature -> the first line of its docstring, scored by BLEU), a 2048-piece
                   sentencepiece vocabulary shared by both sides
    size=base      the paper's base model (d_model 512, 6 + 6 layers, 8 heads, MLP 2048) on
                   signature_to_doc: a GPU/TPU run
    task=NAME      another built-in task of flaxllm.data.tasks
    steps=N        total steps (default by size)
    schedule=rsqrt the paper's warm-up then inverse-square-root decay (lr = d_model^-0.5 *
                   warmup^-0.5 at the peak; default: cosine)
A parallel corpus of your own: --config.data.source=jsonl --config.data.path=pairs.jsonl
(records with `source` and `target`, or name them with data.source_key / data.target_key).
"""
from flaxllm.config import base_config, parse_arg

#        d_model layers heads mlp source target batch  steps    lr    task
SIZES = {
    'tiny': (64, 2, 4, 128, 32, 32, 32, 1000, 3e-3, 'snake_to_camel'),
    'small': (256, 3, 8, 1024, 96, 80, 64, 1200, 1e-3, 'signature_to_doc'),
    'base': (512, 6, 8, 2048, 128, 96, 128, 100_000, 7e-4, 'signature_to_doc'),
}


def get_config(arg=None):
  arg = parse_arg(arg, size='tiny', task='', steps=0, schedule='cosine')
  if arg.size not in SIZES:
    raise ValueError(f'unknown size {arg.size!r}; use one of {sorted(SIZES)}.')
  d_model, layers, heads, mlp, source_len, target_len, batch, steps, lr, task = SIZES[arg.size]
  config = base_config()
  config.objective = 'seq2seq'
  config.seed = 0
  config.total_steps = arg.steps or steps
  config.batch_size = batch
  config.seq_len = target_len
  config.seq2seq.source_len = source_len
  config.seq2seq.label_smoothing = 0.1
  config.seq2seq.num_beams = 4
  config.seq2seq.length_penalty = 0.6

  m = config.model
  m.update(arch='encoder_decoder', d_model=d_model, num_layers=layers,
           num_encoder_layers=layers, num_heads=heads, mlp_dim=mlp, mlp_activation='relu',
           norm='layernorm', norm_eps=1e-6, norm_position='post', attn_bias=True,
           mlp_bias=True, position='sinusoidal', tie_embeddings=True, scale_embeddings=True,
           max_seq_len=max(source_len, target_len), dtype='float32')
  config.data.source = 'stdlib_pairs'
  config.data.name = arg.task or task
  if arg.size == 'tiny':
    m.vocab_size = 264             # the byte tokenizer's 259 ids, rounded up to a multiple of 8
    m.dropout = 0.0
    config.tokenizer.kind = 'bytes'
    config.sample.prompt = 'get_config_value'
  else:
    m.vocab_size = 2048
    m.dropout = 0.1
    config.tokenizer.kind = 'sentencepiece'
    config.tokenizer.vocab_size = 2048
    config.data.val_fraction = 0.05
    config.sample.prompt = 'json.dumps(obj, indent=None)'

  config.optim.update(name='adamw', lr=lr, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0)
  config.schedule.update(name=arg.schedule, warmup_steps=min(100 if arg.size == 'tiny' else
                                                             4000, config.total_steps // 4))
  config.log_every = 50
  config.eval_every = config.total_steps // 2
  config.eval_batches = 4
  config.ckpt_every = config.total_steps // 2
  config.sample.max_new_tokens = target_len
  return config
