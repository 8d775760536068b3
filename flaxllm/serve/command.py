"""`flaxllm serve --model=DIR [--adapter=DIR] [--host=127.0.0.1] [--port=8000] [--slots=8]
[--max-len=N] [--api-key=KEY]`: the OpenAI-compatible server (`flaxllm.serve.api`).

--model is anything `flaxllm.rundir.model_source` reads: a flaxllm workdir (its newest
checkpoint), a flaxllm model directory or a Hugging Face directory; its tokenizer is the one
stored there. --adapter is a LoRA adapter on top of it: a PEFT adapter directory
(adapter_config.json + adapter_model.safetensors) or the workdir of a flaxllm LoRA run (its
`adapter/`); it is merged into the base params once at start-up (W0 + scale * A B), so serving
costs what the base model costs. Chat prompts use the per-turn template of the instruction
tuning run (`data.template` in the adapter's or model's workdir config) unless a Hugging Face
tokenizer brings its own chat template.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from flaxllm import rundir
from flaxllm.serve import api
from flaxllm.serve.engine import Engine
from flaxllm.serve.tokens import Tokens


def chat_template(*paths: str) -> str:
  """The per-turn chat template of the first of `paths` that is a workdir of a chat
  instruction-tuning run ('' = the default template)."""
  for path in paths:
    config = os.path.join(path, rundir.CONFIG_FILE)
    if os.path.exists(config):
      data = rundir.read_json(config).get('data') or {}
      if isinstance(data, dict) and data.get('format') == 'chat':
        return data.get('template') or ''
  return ''


def load_engine(model: str, adapter: Optional[str] = None, *, slots: int = 8,
                max_len: Optional[int] = None, max_waiting: int = 256) -> Engine:
  """An Engine (not started) for the model at `model`, with an optional LoRA `adapter`."""
  source = rundir.model_source(model, what='--model')
  if source.model_cfg.arch != 'decoder':
    raise rundir.RunDirError(f'--model={model!r} is an encoder-decoder model; flaxllm serve '
                             'serves decoder-only models.')
  tokenizer = rundir.load_model_tokenizer(source.path, what='--model')
  params = rundir.load_params(source.path, what='--model')
  template_from = [source.path]
  if adapter:
    params = rundir.merge_adapter(params, source.model_cfg, adapter)
    template_from.insert(0, os.path.abspath(os.path.expanduser(adapter)))
  tokens = Tokens(tokenizer, chat_template(*template_from))
  return Engine(source.model_cfg, params, tokens, slots=slots, max_len=max_len,
                max_waiting=max_waiting)


def serve_main(argv: Optional[Sequence[str]] = None) -> int:
  """`flaxllm serve ...` (see the module docstring); runs until interrupted."""
  p = argparse.ArgumentParser(prog='flaxllm serve',
                              description='Serve a model over the OpenAI completions and chat '
                                          'completions API.')
  p.add_argument('--model', required=True,
                 help='a flaxllm workdir, a flaxllm model directory or a Hugging Face directory.')
  p.add_argument('--adapter', help='a LoRA adapter: a PEFT directory or a flaxllm LoRA workdir.')
  p.add_argument('--model-name', help='the model id clients send (default: the --model '
                                      "directory's name).")
  p.add_argument('--host', default='127.0.0.1', help='the address to bind (default loopback).')
  p.add_argument('--port', type=int, default=8000)
  p.add_argument('--slots', type=int, default=8, help='requests decoded together.')
  p.add_argument('--max-len', type=int, default=None,
                 help='prompt + completion tokens per request (default: model.max_seq_len).')
  p.add_argument('--max-waiting', type=int, default=256,
                 help='requests that may wait for a slot; more are answered 503.')
  p.add_argument('--api-key', default=None, help='require "Authorization: Bearer KEY".')
  args = p.parse_args(argv)
  if args.slots < 1:
    raise ValueError(f'--slots must be >= 1, got {args.slots}.')
  if args.max_waiting < 1:
    raise ValueError(f'--max-waiting must be >= 1, got {args.max_waiting}.')
  if not 0 <= args.port < 65536:
    raise ValueError(f'--port must be between 0 and 65535, got {args.port}.')
  engine = load_engine(args.model, args.adapter, slots=args.slots, max_len=args.max_len,
                       max_waiting=args.max_waiting)
  name = args.model_name or os.path.basename(os.path.normpath(args.model))
  app = api.create_app(engine, name, api_key=args.api_key)
  engine.start()
  try:
    server = api.serve_in_thread(app, args.host, args.port)
    print(f'flaxllm serve: {name} on http://{args.host}:{args.port}/v1 ({args.slots} slots, '
          f'{engine.max_len} tokens each); Ctrl-C stops it.', flush=True)
    try:
      server.thread.join()
    except KeyboardInterrupt:
      server.should_exit = True
      server.thread.join()
  finally:
    engine.stop()
  return 0
