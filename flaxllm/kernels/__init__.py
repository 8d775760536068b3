"""Attention kernels and the dispatcher the models call."""
from flaxllm.kernels.reference import attention_mask, reference_attention


def attention(q, k, v, *, causal=False, q_segment_ids=None, kv_segment_ids=None, q_offset=0,
              window=None, softcap=None, sm_scale=None, impl='auto'):
  """Dispatches attention to an implementation ('auto' | 'xla' | 'cudnn' | 'pallas').

  q [batch, seq_q, heads, head_dim]; k, v [batch, seq_kv, kv_heads, head_dim].
  See `flaxllm.kernels.reference` for the masking convention.
  """
  if impl not in ('auto', 'xla'):
    raise NotImplementedError(f"attention impl {impl!r} is not available yet; use 'xla'.")
  return reference_attention(q, k, v, causal=causal, q_segment_ids=q_segment_ids,
                             kv_segment_ids=kv_segment_ids, q_offset=q_offset, window=window,
                             softcap=softcap, sm_scale=sm_scale)
