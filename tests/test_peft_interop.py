"""PEFT round trip against Hugging Face `peft` + `transformers` (random tiny LLaMA built from a
config, no download): the exported adapter loaded by `peft` onto the exported base model gives
flaxllm's LoRA logits; the merged export equals them too; import gives the adapters back;
an adapter for a different base model fails naming the tensor."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxllm import lora, models
from flaxllm.interop import hf, peft as peft_io
from flaxllm.models import params as params_lib

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')


_SETUP = {}


def _setup(scan):
  if scan not in _SETUP:
    _SETUP[scan] = _build(scan)
  return _SETUP[scan]


def _build(scan):
  cfg = models.presets.get('tiny_llama', scan_layers=scan)
  model = models.build(cfg)
  params = random_params(model)
  adapters = lora.init(params, 'all-linear', jax.random.key(1), rank=4, alpha=16)
  leaves, tdef = jax.tree.flatten(adapters)
  rng = np.random.default_rng(2)
  adapters = jax.tree.unflatten(tdef, [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
                                       for x in leaves])  # B != 0
  return cfg, model, params, adapters


def random_params(model, seed: int = 0):
  """Params like `models.init_params(model, ...)` without compiling model.init (slow on a
  loaded CPU): shapes from eval_shape, values N(0, 0.05), norm scales 1 + N(0, 0.1)."""
  abstract = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(seed)
  flat = {p: (1.0 + 0.1 * rng.standard_normal(x.shape) if p.endswith('scale')
              else 0.05 * rng.standard_normal(x.shape)).astype(x.dtype)
          for p, x in params_lib.flatten(abstract).items()}
  return jax.tree.map(jnp.asarray, params_lib.unflatten(flat))


TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12))


def _torch_logits(model):
  with torch.no_grad():
    return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()


@pytest.mark.parametrize('scan', [True])
def test_peft_round_trip(tmp_path, scan):
  cfg, model, params, adapters = _setup(scan)
  ours = np.asarray(jax.jit(model.apply)({'params': lora.combine(params, adapters)}, TOKENS))
  hf.save(cfg, params, str(tmp_path / 'base'))
  peft_io.save_adapter(cfg, adapters, str(tmp_path / 'adapter'),
                       base_model_name_or_path=str(tmp_path / 'base'))
  conf = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert conf['r'] == 4 and conf['lora_alpha'] == 16 and conf['peft_type'] == 'LORA'

  base = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'base'), attn_implementation='eager', dtype=torch.float32)
  plain = _torch_logits(base.eval())
  with_adapter = peft.PeftModel.from_pretrained(base, str(tmp_path / 'adapter')).eval()
  theirs = _torch_logits(with_adapter)
  assert np.max(np.abs(theirs - plain)) > 0.1          # the adapter changes the model
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

  # Merged export: a plain HF checkpoint with W0 + scale * BA.
  peft_io.save_merged(cfg, params, adapters, str(tmp_path / 'merged'))
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'merged'), attn_implementation='eager', dtype=torch.float32).eval()
  np.testing.assert_allclose(_torch_logits(merged), ours, atol=1e-4, rtol=0)

  # Import: the same adapters, in either layout.
  back = peft_io.load_adapter(str(tmp_path / 'adapter'), cfg)
  assert jax.tree.structure(back) == jax.tree.structure(adapters)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(adapters)):
    np.testing.assert_allclose(x, y, atol=1e-7)
  unrolled = peft_io.load_adapter(str(tmp_path / 'adapter'), cfg, scan_layers=False)
  assert len(lora.targets(unrolled)) == 7 * cfg.num_layers

  # An adapter PEFT saved itself (from a PEFT LoRA on the HF model) imports too.
  cfg_t = peft.LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj', 'down_proj'],
                          init_lora_weights=False)
  fresh = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path / 'base'), attn_implementation='eager', dtype=torch.float32)
  theirs_model = peft.get_peft_model(fresh, cfg_t).eval()
  theirs_model.save_pretrained(str(tmp_path / 'theirs'))
  imported = peft_io.load_adapter(str(tmp_path / 'theirs'), cfg)
  ours2 = np.asarray(jax.jit(model.apply)({'params': lora.combine(params, imported)}, TOKENS))
  np.testing.assert_allclose(ours2, _torch_logits(theirs_model), atol=1e-4, rtol=0)


def test_adapter_for_another_base_model(tmp_path):
  cfg, _, params, adapters = _setup(True)
  peft_io.save_adapter(cfg, adapters, str(tmp_path / 'adapter'))
  other = models.presets.get('tiny_llama', mlp_dim=96)
  with pytest.raises(peft_io.PeftInteropError,
                     match=r"adapter tensor 'base_model.model.model.layers.0.mlp.down_proj."
                           r"lora_A.weight' has shape \(4, 128\) but the base model needs "
                           r'\(4, 96\): the adapter was made for a different base model'):
    peft_io.load_adapter(str(tmp_path / 'adapter'), other)
  fewer = models.presets.get('tiny_llama', num_layers=1)
  with pytest.raises(peft_io.PeftInteropError,
                     match=r"names module 'model\.layers\.1\..*the adapter was made for "
                           'a different base model'):
    peft_io.load_adapter(str(tmp_path / 'adapter'), fewer)
  gpt2 = models.presets.get('tiny_gpt2')
  with pytest.raises(peft_io.PeftInteropError, match='LLaMA/Mistral'):
    peft_io.save_adapter(gpt2, adapters, str(tmp_path / 'x'))
