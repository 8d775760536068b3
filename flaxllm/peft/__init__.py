"""Parameter-efficient fine-tuning as parameter-tree transforms.

  flaxllm.lora          LoRA: init / combine / merge / unmerge / split (the public interface)
  peft.rules            regex rules over `/`-joined parameter paths ('all-linear' included)
  peft.quant            NF4 / int8 blockwise quantisation (QLoRA base weights)
  peft.finetune         the trainer's hooks for config.finetune.method
                        ('full' | 'freeze' | 'lora' | 'qlora')
  flaxllm.interop.peft  Hugging Face PEFT adapters (adapter_config.json +
                        adapter_model.safetensors) export and import
"""
from flaxllm.peft import finetune, quant, rules
from flaxllm.peft.finetune import METHODS, hooks
from flaxllm.peft.quant import QuantizedTensor, quantize, quantize_tree
from flaxllm.peft.rules import ALL_LINEAR, RuleError, select

__all__ = ['finetune', 'quant', 'rules', 'METHODS', 'hooks', 'QuantizedTensor', 'quantize',
           'quantize_tree', 'ALL_LINEAR', 'RuleError', 'select']
