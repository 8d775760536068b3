"""flaxllm's own lm-eval tasks: YAML configs over JSONL data in `data/`, built from the Python
standard library by `make_tasks.py` (committed; nothing is downloaded).

    flaxllm eval --model=DIR --tasks=flaxllm_stdlib_docname,flaxllm_stdlib_nextline,flaxllm_stdlib_ppl
    flaxllm eval --model=DIR --tasks=flaxllm_stdlib          # the tag: all three

`TASKS_DIR` is the folder `flaxllm eval` gives lm-eval's TaskManager as an include path.
"""
import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
