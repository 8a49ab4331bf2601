"""NF4 and int8 quantisation against bitsandbytes (its CPU kernels are the oracle)."""

import bitsandbytes.functional as bnb
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftjax import quant

SLOW = pytest.mark.slow
SHAPES = [(96, 128), pytest.param((7, 9), marks=SLOW),  # whole blocks; a partial one
          pytest.param((64, 100), marks=SLOW), pytest.param((576, 192), marks=SLOW)]


def _weights(shape, seed=0):
  return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


def _check_nf4(w: np.ndarray) -> None:
  """Every byte and scale of bitsandbytes' NF4 state, single and double quantised, and every
  dequantisation (NumPy and jax.numpy) of bitsandbytes' own state, bit for bit; the mean
  subtracted before double quantisation within the bound stated in ftjax.quant."""
  for double in (False, True):
    packed, st = bnb.quantize_4bit(torch.tensor(w), blocksize=64, quant_type="nf4",
                                   compress_statistics=double)
    offset = np.float32(st.offset.item()) if double else None
    ours = quant.quantize_nf4(w, double, offset=offset)
    np.testing.assert_array_equal(ours.packed, packed.numpy().reshape(-1))
    theirs = quant.NF4State(packed.numpy().reshape(-1), st.absmax.numpy(), w.shape)
    if double:
      np.testing.assert_array_equal(ours.absmax2, st.state2.absmax.numpy())
      np.testing.assert_array_equal(ours.code2, st.state2.code.numpy())
      np.testing.assert_array_equal(ours.absmax, st.absmax.numpy())  # given bnb's mean
      own_mean = quant.quantize_nf4(w, True).offset
      assert abs(own_mean - offset) <= 1e-6 * abs(offset)  # torch's fp32 sum: a few ulps off
      theirs = quant.NF4State(theirs.packed, theirs.absmax, w.shape, offset,
                              st.state2.absmax.numpy(), st.state2.code.numpy())
    else:
      np.testing.assert_array_equal(ours.absmax, st.absmax.numpy())
    want = bnb.dequantize_4bit(packed, st).numpy()
    np.testing.assert_array_equal(quant.dequantize_nf4(theirs), want)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_nf4(theirs, jnp)), want)


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_equals_bitsandbytes(shape):
  _check_nf4(_weights(shape))


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_equals_bitsandbytes(shape):
  w = _weights(shape, seed=1)
  q, stats, _ = bnb.int8_vectorwise_quant(torch.tensor(w))
  ours = quant.quantize_int8(w)
  np.testing.assert_array_equal(ours.q, q.numpy())
  np.testing.assert_array_equal(ours.absmax, stats.numpy())
  want = bnb.int8_vectorwise_dequant(q, stats).numpy()
  np.testing.assert_array_equal(quant.dequantize_int8(ours), want)
  np.testing.assert_array_equal(np.asarray(quant.dequantize_int8(ours, jnp)), want)


def test_8bit_scales_follow_the_cpu_and_cuda_kernels():
  """The cpu rule is bitsandbytes' CPU kernel byte for byte on values crowding every midpoint;
  the cuda rule picks the nearest entry, and the two differ only next to midpoints."""
  code = quant.dynamic_map()
  mid = (code[:-1] + code[1:]) / 2
  rng = np.random.default_rng(0)
  x = np.concatenate([rng.uniform(-1, 1, 2**16),
                      (mid[:, None] + rng.uniform(-4e-5, 4e-5, (mid.size, 64))).reshape(-1)])
  x = x.astype(np.float32)
  x[::256] = 1  # each block's absmax is 1, so the values are not rescaled
  ours, absmax, _ = quant.quantize_blockwise8(x)
  theirs, state = bnb.quantize_blockwise(torch.tensor(x), blocksize=256)
  np.testing.assert_array_equal(ours, theirs.numpy())
  np.testing.assert_array_equal(absmax, state.absmax.numpy())
  nearest, _, _ = quant.quantize_blockwise8(x, kernel="cuda")
  assert np.all(np.abs(x - code[nearest]) <= np.abs(x - code[ours]))
  differ = nearest != ours
  assert differ.any() and np.all(np.abs(x[differ] - mid[np.minimum(nearest, ours)[differ]]) < 2e-5)


def test_the_dynamic_map_is_bitsandbytes():
  np.testing.assert_array_equal(quant.dynamic_map(), bnb.create_dynamic_map().numpy())
  np.testing.assert_array_equal(quant.NF4, bnb.get_4bit_type("nf4", device="cpu").numpy())


@pytest.mark.smollm2
def test_nf4_of_smollm2_weights_equals_bitsandbytes(smollm2_dir):
  from safetensors.numpy import load_file

  weights = load_file(f"{smollm2_dir}/model.safetensors")
  for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight"):
    _check_nf4(weights[name].astype(np.float32))
