"""Evaluation through EleutherAI's lm-evaluation-harness.

`flaxllm.evaluation.harness` is the lm-eval model backend registered as `flaxllm`; it imports
`lm_eval`, so this package does not import it: `import flaxllm.evaluation.harness` when you use
it (before `lm_eval.simple_evaluate(model='flaxllm', ...)`).
"""
