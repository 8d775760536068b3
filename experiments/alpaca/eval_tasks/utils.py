"""The Alpaca experiment's harness tasks: JSONL next to the YAML, prompts in the Alpaca
template the students were trained with (flaxllm's `alpaca_prompt`)."""
import os

from flaxllm.data.instruct import alpaca_prompt  # noqa: F401 -- the tasks' doc_to_text
from flaxllm.evaluation.tasks.utils import jsonl_loader

load_jsonl = jsonl_loader(os.path.dirname(os.path.abspath(__file__)))
