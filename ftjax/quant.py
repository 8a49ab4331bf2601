"""Quantised frozen weights, byte-compatible with bitsandbytes: NF4 (with double quantisation)
and row-wise int8.

NF4, as bitsandbytes' `quantize_4bit(quant_type="nf4", blocksize=64)`: the weight, flattened in
its (out, in) layout, is cut into blocks of 64; each block's absmax is kept in fp32; values are
multiplied by the reciprocal of their block's absmax, clipped to [-1, 1] and given the index of
the nearest of the 16 NF4 codes (a value halfway between two codes takes the lower one); two
indices share a byte, the first in the high nibble. Double quantisation
(`compress_statistics=True`) stores the absmax values as bytes: their mean (`offset`) is
subtracted, the rest is cut into blocks of 256, each divided by its own fp32 absmax and given
the index of the nearest entry of bitsandbytes' signed 8-bit dynamic map. Dequantisation is
code[index] * scale, and for double quantisation the scale is code8[byte] * absmax2 + offset,
each an fp32 product or sum as bitsandbytes computes it.

Int8, as bitsandbytes' `int8_vectorwise_quant` (LLM.int8() without outliers): one fp32 absmax
per output row, q = round-half-even(w * (127 / absmax)), w ≈ q * absmax * (1/127).

Quantisation runs once on the host in NumPy (a model's weights never exist dequantised on the
device); the dequantisations take `xp=jax.numpy` to run the same arithmetic inside a layer.
bitsandbytes itself needs PyTorch, and no JAX library reproduces its formats, hence this module.

Two parts of double quantisation are not bit for bit bitsandbytes' own, and tests/test_quant.py
bounds both: the `offset` (bitsandbytes takes torch's fp32 mean, whose summation order depends on
the device and its vector width; ftjax the fp32 rounding of the exact mean), and the 8-bit index
of an absmax whose scaled value lies within about 2e-5 of the midpoint between two map entries
(bitsandbytes 0.50's CPU kernel does not split exactly at midpoints, as if it looked values up on
a grid of about 2^-16; ftjax takes the nearest entry, ties to the lower). Everything else — the
NF4 bytes, single-level scales, the second-level scales, and every dequantisation of a given
state — is bit for bit.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Optional

import numpy as np

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
_NF4_BOUNDS = ((NF4[:-1] + NF4[1:]) / np.float32(2)).astype(np.float32)
# bitsandbytes.functional.create_dynamic_map(signed=True): 256 little-endian fp32 values
_DYNAMIC = "".join([
    "MzN+v5qZer8AAHe/ZmZzv83Mb78zM2y/mplovwAAZb9mZmG/zcxdvzMzWr+amVa/AABTv2ZmT7/NzEu/MzNIv5qZRL8A"
    "AEG/ZmY9v83MOb80Mza/mpkyvwAAL79mZiu/zcwnvzQzJL+amSC/AAAdv2ZmGb/NzBW/NDMSv5qZDr8AAAu/ZmYHv8zM"
    "A78zMwC/MjP5vgAA8r7MzOq+mpnjvmZm3L4zM9W+AADOvszMxr6amb++Zma4vjMzsb4AAKq+zMyivpqZm75mZpS+NDON"
    "vgAAhr6ZmX2+MzNvvs3MYL5mZlK+AABEvpqZNb4zMye+zcwYvmZmCr4AAPi9NDPbvYXryb33KMS9Z2a+vdejuL1I4bK9"
    "uB6tvSpcp72amaG9CtebvXsUlr3rUZC9XY+Kvc3MhL17FH69XY9yvT0KZ70fhVu9AABQveF6RL3D9Ti9o3AtvYXrIb1n"
    "Zha9SOEKvVK4/rwVrue816PQvJqZubxdj6K8H4WLvMP1aLxI4Tq8ZDsfvBgEFrzNzAy8gZUDvGq89LvTTeK7O9/Pu6Rw"
    "vbsNAqu7dJOYu90khruKbGe7XI9Cuy2yHbv8qfG6ne+nuv9ld7o+6Fm6gGo8usHsHroBbwG6g+LHuQXnjLkL1yO5Sx+6"
    "uLPvirg0gDe4BkKyt/8FAreUGlq2t6MTtQAAAAC3oxM1lBpaNv8FAjcGQrI3NIA3OLPvijhLH7o4C9cjOQXnjDmD4sc5"
    "AW8BOsHsHjqAajw6PuhZOv9ldzqd76c6/KnxOi2yHTtcj0I7imxnO90khjt0k5g7DQKrO6RwvTs73887003iO2q89DuB"
    "lQM8zcwMPBgEFjxkOx88SOE6PMP1aDwfhYs8XY+iPJqZuTzXo9A8Fa7nPFK4/jxI4Qo9Z2YWPYXrIT2jcC09w/U4PeF6"
    "RD0AAFA9H4VbPT0KZz1dj3I9exR+Pc3MhD1dj4o961GQPXsUlj0K15s9mpmhPSpcpz24Hq09SOGyPdejuD1nZr499yjE"
    "PYXryT00M9s9AAD4PWZmCj7NzBg+MzMnPpqZNT4AAEQ+ZmZSPs3MYD4zM28+mZl9PgAAhj40M40+ZmaUPpqZmz7MzKI+"
    "AACqPjMzsT5mZrg+mpm/PszMxj4AAM4+MzPVPmZm3D6ameM+zMzqPgAA8j4yM/k+MzMAP8zMAz9mZgc/AAALP5qZDj80"
    "MxI/zcwVP2ZmGT8AAB0/mpkgPzQzJD/NzCc/ZmYrPwAALz+amTI/NDM2P83MOT9mZj0/AABBP5qZRD8zM0g/zcxLP2Zm"
    "Tz8AAFM/mplWPzMzWj/NzF0/ZmZhPwAAZT+amWg/MzNsP83Mbz9mZnM/AAB3P5qZej8zM34/AACAPw=="
])
BLOCK, BLOCK2 = 64, 256  # NF4 values per absmax; absmax values per second-level scale


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values in [-0.993, 1])."""
  return np.frombuffer(base64.b64decode(_DYNAMIC), "<f4").astype(np.float32)


@dataclasses.dataclass
class NF4State:
  """A weight in NF4: `packed` (n/2,) uint8 and its block scales (`absmax` fp32, or with
  double quantisation `absmax` uint8 with `absmax2` fp32 per 256, `offset` and `code2`)."""

  packed: np.ndarray
  absmax: np.ndarray
  shape: tuple
  offset: Optional[np.float32] = None
  absmax2: Optional[np.ndarray] = None
  code2: Optional[np.ndarray] = None

  @property
  def double(self) -> bool:
    return self.absmax2 is not None


def _blocks(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """x cut into blocks of `size` (the last padded with zeros) and each block's absmax."""
  n = x.size
  padded = np.zeros(-(-n // size) * size, np.float32)
  padded[:n] = x
  blocks = padded.reshape(-1, size)
  return blocks, np.abs(blocks).max(axis=1)


def quantize_blockwise8(x: np.ndarray, blocksize: int = BLOCK2
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """bitsandbytes' `quantize_blockwise` with the dynamic map, each value given its nearest
  entry: (bytes, absmax, code)."""
  code = dynamic_map()
  blocks, absmax = _blocks(np.asarray(x, np.float32).reshape(-1), blocksize)
  with np.errstate(divide="ignore", invalid="ignore"):
    normed = (blocks / absmax[:, None]).reshape(-1)[:x.size]
  normed = np.where(np.isnan(normed), code[0], normed)  # an all-zero block: index 0 (any would do)
  left = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, 255)
  right = np.minimum(left + 1, 255)
  closer = np.abs(normed - code[right]) < np.abs(normed - code[left])
  return np.where(closer, right, left).astype(np.uint8), absmax, code


def quantize_nf4(w: np.ndarray, double: bool = True, offset: Optional[float] = None
                 ) -> NF4State:
  """`w` (out, in) in NF4 as bitsandbytes' `quantize_4bit(..., blocksize=64,
  quant_type="nf4", compress_statistics=double)`; `offset`: the double-quantisation mean to
  use (default: the fp32 rounding of the exact mean)."""
  w = np.asarray(w, np.float32)
  blocks, absmax = _blocks(w.reshape(-1), BLOCK)
  scaled = np.clip(blocks * (np.float32(1) / np.maximum(absmax, np.float32(1e-38)))[:, None],
                   -1, 1).reshape(-1)[:w.size]
  if scaled.size % 2:
    scaled = np.append(scaled, np.float32(0))
  q = np.searchsorted(_NF4_BOUNDS, scaled, side="left").astype(np.uint8)
  packed = (q[0::2] << 4) | q[1::2]
  if not double:
    return NF4State(packed, absmax, tuple(w.shape))
  if offset is None:
    offset = np.float32(absmax.astype(np.float64).mean())
  offset = np.float32(offset)
  qabs, absmax2, code2 = quantize_blockwise8(absmax - offset)
  return NF4State(packed, qabs, tuple(w.shape), offset, absmax2, code2)


def _scales(xp, absmax, absmax2, offset, code2, n: int):
  """The fp32 scale of each NF4 block: `absmax` itself, or its double-quantised form."""
  if absmax2 is None:
    return absmax
  idx = xp.arange(n) // BLOCK2
  return code2[absmax.astype(xp.int32)] * absmax2[idx] + offset


def dequantize_nf4(state: NF4State, xp=np) -> np.ndarray:
  """The fp32 weight bitsandbytes' `dequantize_4bit` gives (`xp`: numpy, or jax.numpy)."""
  packed = xp.asarray(state.packed)
  q = xp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1).astype(xp.int32)
  n = int(np.prod(state.shape))
  nf4 = xp.asarray(NF4)
  scales = _scales(xp, xp.asarray(state.absmax), None if state.absmax2 is None else
                   xp.asarray(state.absmax2), state.offset,
                   None if state.code2 is None else xp.asarray(state.code2), state.absmax.size)
  values = nf4[q[:n]]
  full = -(-n // BLOCK) * BLOCK
  values = xp.pad(values, (0, full - n)).reshape(-1, BLOCK) * scales[:, None]
  return values.reshape(-1)[:n].reshape(state.shape)


@dataclasses.dataclass
class Int8State:
  """A weight in row-wise int8: `q` (out, in) int8 and `absmax` (out,) fp32."""

  q: np.ndarray
  absmax: np.ndarray


def quantize_int8(w: np.ndarray) -> Int8State:
  """bitsandbytes' `int8_vectorwise_quant` of `w` (out, in), without outlier columns."""
  w = np.asarray(w, np.float32)
  absmax = np.abs(w).max(axis=1)
  q = np.rint(w * (np.float32(127) / absmax)[:, None]).astype(np.int8)
  return Int8State(q, absmax)


def dequantize_int8(state: Int8State, xp=np):
  """bitsandbytes' `int8_vectorwise_dequant`: q * absmax * (1/127), in fp32."""
  q, absmax = xp.asarray(state.q), xp.asarray(state.absmax)
  return q.astype(xp.float32) * absmax[:, None] * xp.float32(7.874015718698502e-3)


__all__ = ["NF4", "BLOCK", "BLOCK2", "NF4State", "Int8State", "dynamic_map", "quantize_nf4",
           "dequantize_nf4", "quantize_blockwise8", "quantize_int8", "dequantize_int8"]
