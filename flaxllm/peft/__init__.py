"""Parameter-efficient fine-tuning as parameter-tree transforms (the model is never rewritten).

  peft.lora         LoRA: init / combine / merge / unmerge / split (re-exported as flaxllm.lora)
  peft.quant        NF4 / int8 blockwise quantisation (QLoRA base weights)
  peft.path_rules   regex rules over `/`-joined parameter paths ('all-linear' included)

The trainer's fine-tuning methods (`config.finetune.method`: full | freeze | lora | qlora) are
`flaxllm.objectives.finetune`; Hugging Face PEFT adapters are `flaxllm.interop.peft`.
"""
