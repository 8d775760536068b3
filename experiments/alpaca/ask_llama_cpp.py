"""The exported student answering in llama.cpp: an Alpaca prompt through llama-cpp-python's
own tokenizer and sampler (greedy), next to flaxllm's greedy answer from the same model dir.

    python experiments/alpaca/ask_llama_cpp.py --gguf=runs/alpaca/student-q8_0.gguf \
        --model=runs/alpaca/student --out=runs/alpaca/llama_cpp.json \
        --instruction="Join these words with hyphens: string value module"
"""
from __future__ import annotations

import argparse
import json
import os
import time

from flaxllm import rundir
from flaxllm.data.instruct import alpaca_prompt
from flaxllm.generate import generate
from flaxllm.interop.gguf import llama_cpp_model


def flaxllm_answer(model_dir: str, prompt: str, max_tokens: int) -> str:
  source = rundir.model_source(model_dir, what='--model')
  tok = rundir.load_tokenizer(source.path)
  params = rundir.load_params(source.path)
  ids = generate(source.model_cfg, params, [[tok.bos_id] + tok.encode(prompt)],
                 max_new_tokens=max_tokens, temperature=0.0, stop_tokens=[tok.eos_id])[0]
  return tok.decode(ids[:-1] if ids[-1:] == [tok.eos_id] else ids)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--gguf', required=True)
  p.add_argument('--model', required=True, help='the flaxllm model the file was exported from.')
  p.add_argument('--instruction', default='Join these words with hyphens: string value module')
  p.add_argument('--input', default='')
  p.add_argument('--max-tokens', type=int, default=32)
  p.add_argument('--out', default=None, help='also write the answers here (JSON).')
  args = p.parse_args(argv)
  prompt = alpaca_prompt({'instruction': args.instruction, 'input': args.input, 'output': ''})
  llm = llama_cpp_model(args.gguf, n_ctx=256, n_threads=os.cpu_count(), verbose=False)
  start = time.perf_counter()
  reply = llm.create_completion(prompt, max_tokens=args.max_tokens, temperature=0.0)
  seconds = time.perf_counter() - start
  answer = reply['choices'][0]['text']
  reference = flaxllm_answer(args.model, prompt, args.max_tokens)
  result = {'gguf': args.gguf, 'instruction': args.instruction, 'input': args.input,
            'llama_cpp': answer, 'flaxllm': reference, 'equal': answer == reference,
            'llama_cpp_seconds': seconds, 'completion_tokens': reply['usage']['completion_tokens']}
  print(f'### Instruction:\n{args.instruction}\n\nllama.cpp ({os.path.basename(args.gguf)}, '
        f'{seconds:.2f} s): {answer!r}\nflaxllm generate (greedy): {reference!r}\n'
        f'{"the same answer" if answer == reference else "DIFFERENT answers"}')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(result, f, indent=1)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
