"""LoRA as parameter-tree transforms (public API): `flaxllm.peft.lora`, re-exported here so
that `from flaxllm import lora` keeps working."""
from flaxllm.peft.lora import *  # noqa: F401,F403
from flaxllm.peft.lora import __all__  # noqa: F401
