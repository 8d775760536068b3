"""Tests for flaxllm.kernels: Pallas flash/decode attention in interpret mode on CPU.

Every kernel output and gradient is compared with independent references:
`reference_attention` (plain XLA softmax, the repo's masking convention) and, where it
can express the mask, `jax.nn.dot_product_attention`. Both the GPU (Triton-style) and
TPU (Mosaic-style) kernels run in the Pallas interpreter with small blocks so that every
case spans several tiles; they are also lowered for 'cuda' and 'tpu' with `jax.export`,
which runs the real Triton / Mosaic lowerings (not the final compilers) on this machine.

The interpreted kernels are compiled with XLA's backend optimisations off: it is 4-5x
faster to compile and does not change the numerics under test.
"""
import dataclasses
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from flaxllm import kernels
from flaxllm.kernels import blocks
from flaxllm.kernels import BlockSizes, decode_attention, flash_attention, reference_attention

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
SMALL = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16,
                   block_k_dq=32)
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


@pytest.fixture(autouse=True, scope='module')
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def run(fn, *args):
  """fn(*args), jitted and compiled without XLA backend optimisations."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def out_and_grads(attn, q, k, v, do):
  """(out, dq, dk, dv) of attn(q, k, v) with the cotangent do, as float32 numpy."""
  def f(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return (out, *vjp(do))
  return [np.asarray(x, np.float32) for x in run(f, q, k, v, do)]


def assert_close(got, want, dtype, what):
  tol = TOL[dtype]
  for name, g, w in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(g, w, atol=tol, rtol=tol, err_msg=f'{what}: {name}')


def make_inputs(seed, *, batch, seq_q, seq_kv, heads, kv_heads, head_dim, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, seq_q, heads, head_dim), jnp.float32)
  k = jax.random.normal(ks[1], (batch, seq_kv, kv_heads, head_dim), jnp.float32)
  v = jax.random.normal(ks[2], (batch, seq_kv, kv_heads, head_dim), jnp.float32)
  do = jax.random.normal(ks[3], (batch, seq_q, heads, head_dim), jnp.float32)
  return [x.astype(dtype) for x in (q, k, v, do)]


def packed_segments(batch, seq, docs, seed):
  """[batch, seq] ids of `docs` contiguous documents with random boundaries."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, seq), np.int32)
  for b in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, seq), size=min(docs, seq) - 1, replace=False))
    for c in cuts:
      ids[b, c:] += 1
  return jnp.asarray(ids)


@dataclasses.dataclass(frozen=True)
class Case:
  backend: str = 'gpu'
  dtype: type = jnp.float32
  causal: bool = True
  groups: int = 1
  kv_heads: int = 1
  segments: bool = False
  window: int | None = None
  softcap: float | None = None
  seq_q: int = 64
  seq_kv: int | None = None  # None: seq_q (self-attention)
  head_dim: int = 64
  q_offset: int = 0
  batch: int = 1

  def __str__(self):
    fields = [f'{f.name}={getattr(self, f.name)}' for f in dataclasses.fields(self)
              if getattr(self, f.name) != f.default]
    return ','.join(fields) or 'default'


# Covers every axis of the grid (causal, GQA 1/4/8, segments, window, seq 1, lengths that
# are not multiples of the blocks, head dims 64/128, f32/bf16) on both kernel families.
CASES = [
    Case(),
    Case(causal=False, groups=4, seq_q=50, head_dim=128),
    Case(groups=8, segments=True, seq_q=45, batch=2),
    Case(groups=4, kv_heads=2, window=40, seq_q=100),
    Case(causal=False, window=40, seq_q=90, head_dim=128),
    Case(groups=4, seq_q=1),
    Case(causal=False, seq_q=1, seq_kv=37),
    Case(seq_q=20, seq_kv=44, q_offset=24, softcap=5.0, groups=4),
    Case(dtype=jnp.bfloat16, groups=4, segments=True, window=24, seq_q=64, head_dim=128),
    Case(dtype=jnp.bfloat16, causal=False, groups=8, seq_q=40),
    Case(backend='tpu', window=40, seq_q=100),
    Case(backend='tpu', causal=False, groups=4, seq_q=50, head_dim=128),
    Case(backend='tpu', groups=8, segments=True, window=16, seq_q=45, batch=2),
    Case(backend='tpu', groups=4, seq_q=1),
    Case(backend='tpu', seq_q=20, seq_kv=44, q_offset=24, softcap=5.0, groups=4, kv_heads=2),
    Case(backend='tpu', dtype=jnp.bfloat16, causal=False, window=20, segments=True,
         seq_q=33, head_dim=128),
]


def case_inputs(c):
  seq_kv = c.seq_kv or c.seq_q
  q, k, v, do = make_inputs(zlib.crc32(str(c).encode()) % 1000, batch=c.batch, seq_q=c.seq_q, seq_kv=seq_kv,
                            heads=c.groups * c.kv_heads, kv_heads=c.kv_heads,
                            head_dim=c.head_dim, dtype=c.dtype)
  segs = None
  if c.segments:
    assert c.seq_kv is None
    segs = packed_segments(c.batch, c.seq_q, 3, seed=c.seq_q)
  return q, k, v, do, segs


@pytest.mark.parametrize('c', CASES, ids=str)
def test_flash_matches_references(c):
  q, k, v, do, segs = case_inputs(c)
  mask = dict(causal=c.causal, window=c.window, softcap=c.softcap)
  got = out_and_grads(
      lambda q, k, v: flash_attention(q, k, v, segment_ids=segs, q_offset=c.q_offset,
                                      block_sizes=SMALL, backend=c.backend, **mask),
      q, k, v, do)
  # References in float32 on the same (possibly bf16-rounded) inputs.
  f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
  want = out_and_grads(
      lambda q, k, v: reference_attention(q, k, v, q_segment_ids=segs, kv_segment_ids=segs,
                                          q_offset=c.q_offset, **mask), *f32)
  assert_close(got, want, c.dtype, 'vs reference_attention')

  if c.softcap is None and c.q_offset == 0:  # jax.nn cannot express these two
    seq_kv = k.shape[1]
    nn_mask = None if segs is None else (segs[:, None, :, None] == segs[:, None, None, :])
    window = None
    if c.window is not None:
      window = (c.window - 1, 0 if c.causal else seq_kv)
    nn_want = out_and_grads(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, mask=nn_mask, is_causal=c.causal, local_window_size=window,
            implementation='xla'), *f32)
    assert_close(got, nn_want, c.dtype, 'vs jax.nn.dot_product_attention')


def test_rows_without_keys_return_zeros_and_zero_grads():
  """Cross-segment queries that match no key give zeros, finite grads, like the reference."""
  q, k, v, do = make_inputs(7, batch=1, seq_q=24, seq_kv=40, heads=4, kv_heads=2, head_dim=64,
                            dtype=jnp.float32)
  q_seg = jnp.asarray([[1] * 8 + [2] * 8 + [9] * 8])  # segment 9 has no keys
  kv_seg = jnp.asarray([[1] * 20 + [2] * 20])
  for backend in ('gpu', 'tpu'):
    got = out_and_grads(lambda q, k, v: flash_attention(
        q, k, v, segment_ids=(q_seg, kv_seg), block_sizes=SMALL, backend=backend), q, k, v, do)
    want = out_and_grads(lambda q, k, v: reference_attention(
        q, k, v, q_segment_ids=q_seg, kv_segment_ids=kv_seg), q, k, v, do)
    assert np.all(got[0][:, 16:] == 0) and np.all(np.isfinite(np.concatenate(
        [g.ravel() for g in got])))
    assert_close(got, want, jnp.float32, backend)


def test_default_block_sizes_and_default_scale():
  """Default (large) blocks shrink to short sequences; sm_scale defaults to 1/sqrt(d)."""
  q, k, v, do = make_inputs(3, batch=1, seq_q=40, seq_kv=40, heads=2, kv_heads=1,
                            head_dim=64, dtype=jnp.float32)
  got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=True), q, k, v, do)
  want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v, do)
  assert_close(got, want, jnp.float32, 'defaults')
  got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, sm_scale=0.3,
                                                      block_sizes=SMALL), q, k, v, do)
  want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, sm_scale=0.3), q, k, v, do)
  assert_close(got, want, jnp.float32, 'sm_scale')


def test_head_dim_not_a_power_of_two_is_padded_for_triton():
  q, k, v, do = make_inputs(4, batch=1, seq_q=20, seq_kv=20, heads=2, kv_heads=2,
                            head_dim=40, dtype=jnp.float32)
  got = out_and_grads(lambda q, k, v: flash_attention(q, k, v, causal=True, block_sizes=SMALL),
                      q, k, v, do)
  want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v, do)
  assert_close(got, want, jnp.float32, 'head_dim=40')


# ------------------------------------------------------------------------------ decode

DECODE_CASES = [
    # backend, seq_q, groups, cache, window, segments, dtype, block_k, num_splits
    ('gpu', 1, 4, 64, None, False, jnp.float32, 16, 3),
    ('gpu', 3, 8, 50, 20, True, jnp.float32, 16, None),
    ('gpu', 2, 1, 128, None, False, jnp.bfloat16, 32, 2),
    ('tpu', 1, 4, 64, 24, False, jnp.float32, 16, 2),
    ('tpu', 3, 8, 50, None, True, jnp.bfloat16, 16, None),
]


@pytest.mark.parametrize('backend,seq_q,groups,cache,window,segments,dtype,block_k,splits',
                         DECODE_CASES)
def test_decode_matches_reference(backend, seq_q, groups, cache, window, segments, dtype,
                                  block_k, splits):
  q, k, v, _ = make_inputs(cache + seq_q, batch=2, seq_q=seq_q, seq_kv=cache, heads=2 * groups,
                           kv_heads=2, head_dim=64, dtype=dtype)
  q_seg = kv_seg = None
  if segments:  # segment 1 = written cache slots, 0 = left padding of the second row
    kv_seg = jnp.ones((2, cache), jnp.int32).at[1, :5].set(0)
    q_seg = jnp.ones((2, seq_q), jnp.int32)
  f32 = [x.astype(jnp.float32) for x in (q, k, v)]

  def kernel(q, k, v, offset):
    return decode_attention(q, k, v, q_offset=offset, window=window, q_segment_ids=q_seg,
                            kv_segment_ids=kv_seg, block_k=block_k, num_splits=splits,
                            backend=backend)

  for offset in (0, 17, cache - seq_q):  # one compilation: the offset is traced
    got = run(kernel, q, k, v, jnp.int32(offset))
    want = reference_attention(*f32, causal=True, q_offset=offset, window=window,
                               q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=TOL[dtype],
                               rtol=TOL[dtype], err_msg=f'offset={offset}')


@pytest.mark.parametrize('backend,seq_q,groups,window,segments', [
    ('gpu', 1, 4, None, True), ('tpu', 3, 2, 24, False)])
def test_heads_major_cache_is_read_in_place(backend, seq_q, groups, window, segments):
  """A [batch, kv_heads, seq_kv, head_dim] cache (generate's layout) gives what the
  [batch, seq_kv, kv_heads, head_dim] one gives, through the decode kernels and the reference,
  with no transpose or copy of the cache in the compiled XLA path (the seq-major layout has
  one at every step)."""
  cache = 48
  q, k, v, _ = make_inputs(cache + seq_q, batch=2, seq_q=seq_q, seq_kv=cache, heads=2 * groups,
                           kv_heads=2, head_dim=64, dtype=jnp.float32)
  kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)
  q_seg = kv_seg = None
  if segments:
    kv_seg = jnp.ones((2, cache), jnp.int32).at[1, :5].set(0)
    q_seg = jnp.ones((2, seq_q), jnp.int32)
  mask = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg, window=window)
  for offset in (0, cache - seq_q):
    want = reference_attention(q, k, v, causal=True, q_offset=offset, **mask)
    got = reference_attention(q, kh, vh, causal=True, q_offset=offset, heads_major_kv=True,
                              **mask)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    got = run(lambda q, k, v, o: decode_attention(q, k, v, q_offset=o, block_k=16, num_splits=2,
                                                  backend=backend, heads_major_kv=True, **mask),
              q, kh, vh, jnp.int32(offset))
    np.testing.assert_allclose(got, want, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])

  def cache_copies(k, v, heads_major_kv):   # transposes / copies of a whole cache, compiled
    step = jax.jit(lambda q, k, v, o: kernels.attention(
        q, k, v, causal=True, q_offset=o, impl='xla', heads_major_kv=heads_major_kv, **mask))
    hlo = step.lower(q, k, v, jnp.int32(0)).compile().as_text()
    return [line for line in hlo.splitlines()
            if line.split(' = ', 1)[-1].startswith('f32[2,2,48,64]')
            and ('transpose(' in line or ' copy(' in line)]
  assert cache_copies(k, v, False)            # the other layout moves the cache every step
  assert not cache_copies(kh, vh, True)


# --------------------------------------------------------------------- blocked (CPU path)

BLOCKED_CASES = [
    Case(seq_q=100),                                     # causal, odd length, 4 blocks of 32
    Case(groups=4, kv_heads=2, seq_q=97),                # GQA
    Case(groups=2, segments=True, seq_q=75, batch=2),    # packed documents
    Case(window=20, seq_q=90),                           # sliding window: blocks left skipped
    Case(causal=False, window=17, seq_q=70, groups=4),   # window without causality
    Case(seq_q=40, seq_kv=90, q_offset=50, softcap=5.0, groups=2),   # queries at an offset
    Case(seq_q=70, seq_kv=40, q_offset=-35),             # first block sees no key at all
]


@pytest.mark.parametrize('heads_major_kv', [False, True])
@pytest.mark.parametrize('c', BLOCKED_CASES, ids=str)
def test_blocked_matches_reference(c, heads_major_kv):
  """Blocked attention (query blocks of 32 against only the keys they may see) equals the
  reference, forward and gradients, for every mask the convention has."""
  q, k, v, do, segs = case_inputs(c)
  kw = dict(causal=c.causal, window=c.window, softcap=c.softcap, q_offset=c.q_offset,
            q_segment_ids=segs, kv_segment_ids=segs)
  want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do)
  if heads_major_kv:
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
  got = out_and_grads(lambda q, k, v: kernels.blocked_attention(
      q, k, v, block_q=32, heads_major_kv=heads_major_kv, **kw), q, k, v, do)
  if heads_major_kv:
    got[2], got[3] = got[2].swapaxes(1, 2), got[3].swapaxes(1, 2)
    assert_close(got, want, c.dtype, f'blocked {c}')


def test_blocked_skips_the_keys_above_the_diagonal():
  """The compiled blocked program multiplies (n + 1) / 2n of the square's logits (n blocks)."""
  q, k, v, _ = make_inputs(0, batch=1, seq_q=256, seq_kv=256, heads=2, kv_heads=2,
                           head_dim=16, dtype=jnp.float32)

  def flops(fn):
    return jax.jit(fn).lower(q, k, v).compile().cost_analysis()['flops']
  square = flops(lambda q, k, v: reference_attention(q, k, v, causal=True))
  blocked = flops(lambda q, k, v: kernels.blocked_attention(q, k, v, causal=True, block_q=64))
  assert blocked < 0.7 * square  # 4 blocks: 10 / 16 of the logits (plus the same projections)


def test_auto_on_cpu_is_blocked_also_for_a_prefill_into_a_fresh_cache():
  """impl='auto' on CPU takes the blocked path for more than one block of queries, causal or
  not; with a traced offset (a KV cache) a prefill at slot 0 is attended blocked over the new
  keys, any other slot by the reference, both equal to the reference."""
  q, k, v, _ = make_inputs(3, batch=2, seq_q=160, seq_kv=160, heads=4, kv_heads=2,
                           head_dim=16, dtype=jnp.float32)
  for causal in (True, False):   # without a mask to skip, query blocks still run faster
    auto = lambda q, k, v: kernels.attention(q, k, v, causal=causal)  # noqa: E731
    assert 'concatenate' in str(jax.make_jaxpr(auto)(q, k, v))   # query blocks joined
    np.testing.assert_allclose(run(auto, q, k, v), reference_attention(q, k, v, causal=causal),
                               atol=1e-5, rtol=1e-5)
  kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)                   # a cache of 160 slots
  segs = jnp.asarray(np.repeat([[1] * 140 + [0] * 20], 2, 0), jnp.int32)

  def prefill(q, offset):
    return kernels.attention(q, kh, vh, causal=True, q_offset=offset, q_segment_ids=segs[:, :130],
                             kv_segment_ids=segs, heads_major_kv=True)
  assert 'cond' in str(jax.make_jaxpr(prefill)(q[:, :130], jnp.int32(0)))
  for offset in (0, 10):
    want = reference_attention(q[:, :130], k, v, causal=True, q_offset=offset,
                               q_segment_ids=segs[:, :130], kv_segment_ids=segs)
    np.testing.assert_allclose(run(prefill, q[:, :130], jnp.int32(offset)), want, atol=1e-5,
                               rtol=1e-5, err_msg=f'offset {offset}')


# -------------------------------------------------------------------------- dispatcher

def test_dispatcher_routes_and_matches_reference():
  q, k, v, _ = make_inputs(5, batch=1, seq_q=32, seq_kv=32, heads=4, kv_heads=2, head_dim=64,
                           dtype=jnp.float32)
  segs = packed_segments(1, 32, 2, seed=1)
  kw = dict(causal=True, q_segment_ids=segs, kv_segment_ids=segs, window=8)
  want = reference_attention(q, k, v, **kw)
  for impl in ('auto', 'xla', 'blocked', 'pallas'):
    got = run(lambda q, k, v: kernels.attention(q, k, v, impl=impl, **kw), q, k, v)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=impl)

  def uses_pallas(fn, *args):
    return 'pallas_call' in str(jax.make_jaxpr(fn)(*args))

  assert not uses_pallas(lambda q: kernels.attention(q, k, v, impl='auto'), q)  # CPU: blocked
  assert uses_pallas(lambda q: kernels.attention(q, k, v, impl='pallas'), q)

  # Generation: a few queries at a traced slot of the cache go to the decode kernel.
  def step(q, offset):
    return kernels.attention(q, k, v, causal=True, q_offset=offset, impl='pallas')
  jaxpr = str(jax.make_jaxpr(step)(q[:, :2], jnp.int32(9)))
  assert 'decode_attention' in jaxpr
  np.testing.assert_allclose(run(step, q[:, :2], jnp.int32(9)),
                             reference_attention(q[:, :2], k, v, causal=True, q_offset=9),
                             atol=1e-5, rtol=1e-5)


def test_cudnn_arguments_express_the_convention_and_reject_the_rest():
  """The jax.nn arguments built for impl='cudnn' reproduce the reference (checked with
  jax.nn's XLA implementation; cuDNN itself needs a GPU); other masks are refused."""
  q, k, v, _ = make_inputs(6, batch=1, seq_q=24, seq_kv=24, heads=4, kv_heads=1, head_dim=64,
                           dtype=jnp.float32)
  none = dict(q_segment_ids=None, kv_segment_ids=None, q_offset=0, softcap=None)
  for causal, window, scale in [(False, None, None), (True, None, 0.2), (True, 5, None)]:
    args = kernels.cudnn_arguments(causal=causal, window=window, sm_scale=scale, **none)
    np.testing.assert_allclose(
        jax.nn.dot_product_attention(q, k, v, implementation='xla', **args),
        reference_attention(q, k, v, causal=causal, window=window, sm_scale=scale),
        atol=1e-5, rtol=1e-5)
  segs = jnp.zeros((1, 24), jnp.int32)
  for bad, what in [(dict(softcap=3.0), 'soft-cap'), (dict(q_segment_ids=segs), 'segment ids'),
                    (dict(causal=True, q_offset=4), 'q_offset'), (dict(window=4), 'window')]:
    with pytest.raises(ValueError, match=what):
      kernels.attention(q, k, v, impl='cudnn', **bad)
  with pytest.raises(ValueError, match='impl must be one of'):
    kernels.attention(q, k, v, impl='triton')


# --------------------------------------------------------------------------- bad input

def _bad(shape_q=(1, 16, 4, 64), shape_kv=(1, 16, 2, 64), dtype=jnp.float32, **kw):
  q = jnp.zeros(shape_q, dtype)
  k = jnp.zeros(shape_kv, kw.pop('kv_dtype', dtype))
  return q, k, jnp.zeros(shape_kv, k.dtype), kw


BAD_INPUTS = [
    (_bad(shape_q=(1, 16, 3, 64)), 'multiple of the number of key/value heads'),
    (_bad(shape_kv=(1, 16, 2, 32)), 'same head_dim'),
    (_bad(segment_ids=jnp.zeros((1, 15), jnp.int32)), r'segment_ids must have shape'),
    (_bad(segment_ids=(jnp.zeros((1, 16), jnp.int32), jnp.zeros((2, 16), jnp.int32))),
     'kv_segment_ids must have shape'),
    (_bad(segment_ids=jnp.zeros((1, 16), jnp.float32)), 'must be integers'),
    (_bad(dtype=jnp.float16), 'Unsupported dtype float16'),
    (_bad(dtype=jnp.int32), 'Unsupported dtype int32'),
    (_bad(kv_dtype=jnp.bfloat16), 'share one dtype'),
    (_bad(shape_q=(16, 4, 64)), r'q must be \[batch, seq, heads, head_dim\]'),
    (_bad(window=0), 'window must be a positive int'),
    (_bad(q_offset=-1), 'q_offset must be a non-negative'),
]


@pytest.mark.parametrize('inputs,match', BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_raises_one_sentence_before_lowering(inputs, match):
  q, k, v, kw = inputs
  with pytest.raises(ValueError, match=match) as err:
    jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, **kw), q, k, v)
  message = str(err.value)
  assert '\n' not in message and message.endswith('.') and message.count('. ') == 0, message


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match='block_k must be a positive power of two, got 24'):
    dataclasses.replace(SMALL, block_k=24)


def test_decode_bad_input_raises():
  q, k, v, _ = _bad(shape_q=(1, 1, 3, 64))
  with pytest.raises(ValueError, match='multiple of the number of key/value heads'):
    decode_attention(q, k, v, q_offset=0)


# ------------------------------------------------------------------------ block ranges

@pytest.mark.parametrize('causal,window,segments,kv_len',
                         list(itertools.product([False, True], [None, 1, 5, 40], [False, True],
                                                [None, 45])))
def test_block_ranges_cover_exactly_the_allowed_pairs(causal, window, segments, kv_len):
  """Brute force: every allowed pair lies in a visited block, and blocks marked mask-free
  contain no masked pair (segments: no block is mask-free)."""
  spec = blocks.Spec(sm_scale=1.0, causal=causal, window=window, segments=segments,
                     kv_len=kv_len)
  bq, bk, nq, nk = 8, 16, 7, 3
  for q_offset in (0, 5, 30):
    q_pos = q_offset + np.arange(nq * bq)[:, None]
    kv_pos = np.arange(nk * bk)[None, :]
    allowed = np.ones((nq * bq, nk * bk), bool)
    if causal:
      allowed &= kv_pos <= q_pos
    if window is not None:
      allowed &= q_pos - kv_pos < window
    if kv_len is not None:
      allowed &= kv_pos < kv_len
    tiles = allowed.reshape(nq, bq, nk, bk).transpose(0, 2, 1, 3)  # [q blk, kv blk, bq, bk]
    for i in range(nq):
      lo, flo, fhi, hi = (int(x) for x in blocks.kv_block_range(
          spec, q_offset + i * bq, q_offset + i * bq + bq - 1, bk, nk))
      assert 0 <= lo <= flo <= fhi <= hi <= nk
      visited = np.zeros(nk, bool)
      visited[lo:hi] = True
      assert not np.any(tiles[i].any(axis=(1, 2)) & ~visited), (q_offset, i)
      assert all(tiles[i, j].all() for j in range(flo, fhi)), (q_offset, i)
      assert segments <= (flo == fhi)
    for j in range(nk):
      lo, flo, fhi, hi = (int(x) for x in blocks.q_block_range(
          spec, j * bk, j * bk + bk - 1, bq, nq, q_offset))
      assert 0 <= lo <= flo <= fhi <= hi <= nq
      visited = np.zeros(nq, bool)
      visited[lo:hi] = True
      assert not np.any(tiles[:, j].any(axis=(1, 2)) & ~visited), (q_offset, j)
      assert all(tiles[i, j].all() for i in range(flo, fhi)), (q_offset, j)


# -------------------------------------------------------------- lowering for GPU and TPU

LOWERING_CHECKS = [export.DisabledSafetyCheck.custom_call('__gpu$xla.gpu.triton'),
                   export.DisabledSafetyCheck.custom_call('tpu_custom_call')]


@pytest.mark.parametrize('platform,backend', [('cuda', 'gpu'), ('tpu', 'tpu')])
@pytest.mark.parametrize('dtype,head_dim', [(jnp.bfloat16, 128), (jnp.float32, 64)])
def test_kernels_lower_for_the_real_backends(platform, backend, dtype, head_dim):
  """Flash forward + backward and decode (both cache layouts) lower to Triton / Mosaic with
  default blocks."""
  q = jax.ShapeDtypeStruct((2, 1000, 8, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((2, 1000, 2, head_dim), dtype)
  seg = jax.ShapeDtypeStruct((2, 1000), jnp.int32)

  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, causal=True, segment_ids=seg, window=300, softcap=20.0,
                          backend=backend, interpret=False)
    return jnp.sum(out.astype(jnp.float32))

  def decode(q, k, v, offset, heads_major_kv=False):
    return decode_attention(q, k, v, q_offset=offset, window=300, backend=backend,
                            interpret=False, heads_major_kv=heads_major_kv)

  one_query = jax.ShapeDtypeStruct((2, 1, 8, head_dim), dtype)
  offset = jax.ShapeDtypeStruct((), jnp.int32)
  cache = jax.ShapeDtypeStruct((2, 2, 1000, head_dim), dtype)   # heads-major, as generate's
  for fn, args in [(jax.grad(loss, argnums=(0, 1, 2)), (q, kv, kv, seg)),
                   (decode, (one_query, kv, kv, offset)),
                   (lambda *a: decode(*a, heads_major_kv=True), (one_query, cache, cache, offset))]:
    exported = export.export(jax.jit(fn), platforms=[platform],
                             disabled_checks=LOWERING_CHECKS)(*args)
    text = exported.mlir_module()
    assert ('__gpu$xla.gpu.triton' if platform == 'cuda' else 'tpu_custom_call') in text


# ------------------------------------------------------------------------- model level

def test_llama_training_losses_with_pallas_equal_xla():
  """Tiny LLaMA (GQA, packed documents): 3 SGD steps give the same losses and grads."""
  from flaxllm import models

  xla_cfg = models.presets.get('tiny_llama', attention_impl='xla')
  init = models.init_params(models.build(xla_cfg), jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, xla_cfg.vocab_size)
  segs = jnp.asarray(packed_segments(2, 48, 3, seed=2)) + 1

  def train(impl):
    model = models.build(dataclasses.replace(xla_cfg, attention_impl=impl))
    params = init

    def loss_fn(params):
      logits = model.apply({'params': params}, tokens[:, :-1], segment_ids=segs[:, :-1])
      logp = jax.nn.log_softmax(logits.astype(jnp.float32))
      nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
      same_doc = segs[:, 1:] == segs[:, :-1]
      return jnp.sum(nll * same_doc) / jnp.sum(same_doc)

    def step(params):
      loss, grads = jax.value_and_grad(loss_fn)(params)
      return loss, grads, jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)

    compiled = jax.jit(step).lower(params).compile(_FAST_COMPILE)
    history = []
    for _ in range(3):
      loss, grads, params = compiled(params)
      history.append((float(loss), grads))
    return history

  for (loss_p, grads_p), (loss_x, grads_x) in zip(train('pallas'), train('xla')):
    np.testing.assert_allclose(loss_p, loss_x, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grads_p, grads_x)


def test_llama_cached_decoding_with_pallas_matches_full_forward():
  """With attention_impl='pallas', KV-cache decoding (a 3-token prefill, then single tokens,
  all through the decode kernel) reproduces the uncached XLA model's logits."""
  from flaxllm import generate, models

  cfg = models.presets.get('tiny_llama', attention_impl='pallas')
  full = models.build(dataclasses.replace(cfg, attention_impl='xla'))
  params = models.init_params(full, jax.random.key(2))
  seq = jax.random.randint(jax.random.key(3), (2, 7), 0, cfg.vocab_size)
  want = np.asarray(jax.jit(full.apply)({'params': params}, seq))
  dec = generate.decode_model(cfg)

  def step(cache, tokens, positions):
    logits, mutated = dec.apply({'params': params, 'cache': cache}, tokens, positions,
                                jnp.ones_like(tokens), mutable=['cache'])
    return logits, mutated['cache']

  cache = generate.init_cache(dec, 2, 12)
  chunks = [(0, 3)] + [(t, t + 1) for t in range(3, 7)]
  compiled = {}
  for start, stop in chunks:
    positions = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (2, stop - start))
    args = (cache, seq[:, start:stop], positions)
    if stop - start not in compiled:
      compiled[stop - start] = jax.jit(step).lower(*args).compile(_FAST_COMPILE)
      assert 'decode_attention' in str(jax.make_jaxpr(step)(*args))
    logits, cache = compiled[stop - start](*args)
    np.testing.assert_allclose(np.asarray(logits), want[:, start:stop], atol=1e-5, rtol=0)


@pytest.mark.parametrize('rules', ['fsdp_tp', 'dp'])
def test_pallas_runs_per_shard_under_a_mesh(rules):
  """Under jax.set_mesh (8 CPU devices) the dispatcher runs the kernels in a shard_map split
  like the models' activations (batch, and heads for fsdp_tp), matching the reference."""
  from flaxllm.parallel import mesh as mesh_lib
  from flaxllm.parallel import axis_rules as rules_lib
  if jax.device_count() < 8:
    pytest.skip('needs 8 (fake) devices')
  q, k, v, do = make_inputs(8, batch=4, seq_q=32, seq_kv=32, heads=8, kv_heads=2, head_dim=64,
                            dtype=jnp.float32)
  segs = packed_segments(4, 32, 2, seed=3)
  mesh = mesh_lib.make_mesh({'data': 2, 'fsdp': 2, 'tensor': 2})
  kw = dict(causal=True, q_segment_ids=segs, kv_segment_ids=segs)
  with jax.set_mesh(mesh), rules_lib.rules_context(rules):
    attn = lambda q, k, v: kernels.attention(q, k, v, impl='pallas', **kw)  # noqa: E731
    jaxpr = str(jax.make_jaxpr(attn)(q, k, v))
    heads_split = "P(('data', 'fsdp'), None, 'tensor', None)" in jaxpr
    assert 'shard_map' in jaxpr and heads_split == (rules == 'fsdp_tp')
    got = out_and_grads(attn, q, k, v, do)
    offset_out = run(lambda q, o: kernels.attention(q, k, v, causal=True, q_offset=o,
                                                    impl='pallas'), q[:, :2], jnp.int32(5))
  want = out_and_grads(lambda q, k, v: reference_attention(q, k, v, **kw), q, k, v, do)
  assert_close(got, want, jnp.float32, rules)
  np.testing.assert_allclose(offset_out, reference_attention(q[:, :2], k, v, causal=True,
                                                             q_offset=5), atol=1e-5, rtol=1e-5)
