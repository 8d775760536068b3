"""Training objectives: what the trainer trains and how (the protocol: `base.Objective`).

    from flaxllm.objectives import registry
    objective = registry.from_config(config)     # config.objective names one of REGISTRY

  registry.py   REGISTRY (name -> objective class), config sections and checks of them all
  base.py       the protocol, implemented for a language model on packed documents
  lm.py         'lm': next-token prediction (pretraining, instruction tuning)
  distill/      'distill': knowledge distillation from a frozen teacher (config.distill)
  seq2seq.py    'seq2seq': the encoder-decoder Transformer on (source, target) pairs
  finetune.py   what is trained of the model (config.finetune: full | freeze | lora | qlora),
                composed with every objective

Adding an objective: a module with a `base.Objective` subclass, and its entry in
`registry.REGISTRY`; its settings, if any, are its own config section (`config_section` /
`check_section`).
"""
