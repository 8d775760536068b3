"""lm-eval's `local-completions` backend against `flaxllm serve` gives what the in-process
`flaxllm` backend gives: accuracy and per-choice log-likelihoods on a local multiple-choice task
(through `echo` + `logprobs`) and greedy generations (through `stop`), on the random-init
Hugging Face LLaMA directory of tests/test_harness.py (built there; nothing is downloaded)."""
from __future__ import annotations

import socket

import numpy as np
import pytest

lm_eval = pytest.importorskip('lm_eval')
pytest.importorskip('openai')

from test_harness import MAX_LEN, TOL, _req, _write_task, hf_dir, lm, task_scores  # noqa: E402,F401

from flaxllm.serve import api, command  # noqa: E402

NAME = 'tiny-hf'


@pytest.fixture(scope='module')
def served(hf_dir):  # noqa: F811 -- the fixture imported above
  engine = command.load_engine(hf_dir, slots=4)
  engine.start()
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  http = api.serve_in_thread(api.create_app(engine, NAME), '127.0.0.1', port)
  from lm_eval.api.registry import get_model
  yield get_model('local-completions')(
      model=NAME, base_url=f'http://127.0.0.1:{port}/v1/completions', tokenizer=hf_dir,
      tokenizer_backend='huggingface', max_length=MAX_LEN, num_concurrent=4)
  http.should_exit = True
  http.thread.join(timeout=10)
  engine.stop()


def test_same_accuracy_and_loglikelihoods_as_the_flaxllm_backend(lm, served, tmp_path):  # noqa: F811
  tasks = _write_task(tmp_path)
  (acc, lls), (served_acc, served_lls) = task_scores(lm, tasks), task_scores(served, tasks)
  assert served_acc == acc
  np.testing.assert_allclose(np.asarray(served_lls, float), np.asarray(lls, float), atol=TOL)


def test_same_greedy_generations_as_the_flaxllm_backend(lm, served):  # noqa: F811
  reqs = [_req('generate_until', c, dict(until=['\n\n', '))'], max_gen_toks=10, do_sample=False))
          for c in ('def add(a, b):', 'print(', 'x')]
  assert served.generate_until(reqs) == lm.generate_until(reqs, disable_tqdm=True)
