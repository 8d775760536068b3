"""The loader of this folder's tasks: JSONL next to the YAML (flaxllm's `jsonl_loader`)."""
import os

from flaxllm.evaluation.tasks.utils import jsonl_loader

load_jsonl = jsonl_loader(os.path.dirname(os.path.abspath(__file__)))
