"""`flaxllm convert`: checkpoints between flaxllm, Hugging Face and llama.cpp (GGUF).

  flaxllm convert --from-hf=HF_DIR --to=DIR  |  --from=DIR --to-hf=HF_DIR      (interop.hf)
  flaxllm convert --from=DIR --to-gguf=FILE [--type=f32|f16|q8_0] [--adapter=LORA] [--overwrite]

The GGUF direction reads DIR through `flaxllm.rundir` (a flaxllm workdir: its newest checkpoint,
or a LoRA run's merged model/; a flaxllm model directory; a Hugging Face directory) with the
tokenizer stored there, merges an optional LoRA --adapter (a PEFT directory or a flaxllm LoRA
workdir) and writes one GGUF file (`flaxllm.interop.gguf`). This module sits above the run
directory (it loads models), the writers below it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from flaxllm import rundir
from flaxllm.interop import gguf as gguf_export
from flaxllm.interop import hf


def convert_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm convert ...`: --to-gguf goes to `gguf_main`, the rest to `hf.convert_main`."""
  argv = list(sys.argv[2:] if argv is None else argv)
  if any(a == '--to-gguf' or a.startswith('--to-gguf=') for a in argv):
    return gguf_main(argv)
  return hf.convert_main(argv)


def gguf_main(argv: Sequence[str]) -> int:
  """`flaxllm convert --from=DIR --to-gguf=FILE ...` (see the module docstring). Everything
  that can be checked without reading arrays (the destination, the model, its tokenizer, the
  adapter) is checked first: a problem exits with code 2 and one sentence, nothing written."""
  p = argparse.ArgumentParser(
      prog='flaxllm convert',
      description='Write a LLaMA-family or GPT-2 model with its tokenizer as one GGUF file for '
                  'llama.cpp.')
  p.add_argument('--from', dest='source', required=True, metavar='DIR',
                 help='a flaxllm workdir, a flaxllm model directory or a Hugging Face directory.')
  p.add_argument('--to-gguf', required=True, metavar='FILE', help='the .gguf file to write.')
  p.add_argument('--type', default='f32', choices=gguf_export.TYPES,
                 help='f32 (exact), f16 (2-D weights in float16) or q8_0 (2-D weights in 8 bits); '
                      'default %(default)s.')
  p.add_argument('--adapter', help='a LoRA adapter merged in before writing: a PEFT adapter '
                                   'directory or a flaxllm LoRA workdir.')
  p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists.')
  args = p.parse_args(list(argv))

  try:
    gguf_export.check_destination(args.to_gguf, args.overwrite)
    source = rundir.model_source(args.source, what='--from')
    gguf_export.gguf_arch(source.model_cfg)
    tokenizer = rundir.load_tokenizer(source.path)
    if tokenizer is None and not os.path.exists(os.path.join(source.path, 'tokenizer.json')):
      rundir.load_model_tokenizer(source.path, what='--from')   # its one sentence: none there
    vocab = gguf_export.vocab_for(tokenizer, source.path, source.model_cfg.vocab_size)
    adapter = rundir.adapter_dir(args.adapter) if args.adapter else None
  except (ValueError, OSError) as e:
    p.error(str(e))

  start = time.perf_counter()
  params = rundir.load_params(source.path, what='--from')
  if adapter:
    params = rundir.merge_adapter(params, source.model_cfg, adapter)
  loaded = time.perf_counter()
  info = gguf_export.save(source.model_cfg, params, args.to_gguf, vocab=vocab, type=args.type,
                          overwrite=args.overwrite,
                          name=os.path.basename(source.path.rstrip(os.sep)))
  done = time.perf_counter()
  print(f"wrote {args.to_gguf}: GGUF {info['arch']} {args.type}, {info['tensors']} tensors, "
        f"{info['bytes'] / 1e6:.2f} MB (load {loaded - start:.2f} s, write {done - loaded:.2f} s)",
        flush=True)
  return 0
