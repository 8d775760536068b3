"""Knowledge distillation: a frozen teacher's forward inside the student's train step.

  losses.py    divergences (forward/reverse KL, generalised JSD), top-k teacher, T^2 scaling,
               masked per-token sums, hidden-state loss (chunking: flaxllm.models.split)
  loss.py      the trainer LossFn: alpha * KD + (1 - alpha) * CE (+ hidden, z)
  teacher.py   teacher sources (workdir, model dir, HF), checks against the student,
               loading, student initialised from every k-th teacher layer
"""
