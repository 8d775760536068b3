"""Knowledge distillation: a frozen teacher's forward inside the student's train step.

  objective.py    the `distill` objective: config section, teacher loading, the LossFn
                  alpha * KD + (1 - alpha) * CE (+ hidden, z), batch hooks
  divergences.py  forward/reverse KL, generalised JSD, top-k teacher, T^2 scaling, masked
                  per-token sums, hidden-state loss (chunking: flaxllm.models.split)
  teacher.py      checks of a teacher against the student; student initialised from every
                  k-th teacher layer
  offline.py      the teacher's top-k logits computed once (`flaxllm distill-data --mode=topk`)
  onpolicy.py     on-policy student batches (GKD) and sequence-level distillation data
"""
