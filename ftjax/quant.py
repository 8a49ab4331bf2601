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

Quantisation runs once on the host in NumPy, one weight at a time (a model's weights never exist
dequantised on the device); `QuantKernel` is the form a weight then takes in device memory, and
layers dequantise it for their matmul. bitsandbytes itself needs PyTorch, and no JAX library
reproduces its formats (qwix's NF4 keeps scales in the weight dtype, without double
quantisation), hence this module.

bitsandbytes' 8-bit scales of double quantisation depend on the device that quantises: its CPU
kernel rounds each value to a grid of 65536 points and looks the byte up in a table, its CUDA
kernel takes the nearest map entry. They differ for values within about 2e-5 of a midpoint
(about 0.5% of the scales of real weights). `quantize_blockwise8(kernel=...)` follows either,
byte for byte; the loader follows bitsandbytes' kernel for the backend JAX runs on. One part is
not bit for bit: the mean subtracted before double quantisation (`offset`) is the fp32 rounding
of the exact mean, where bitsandbytes takes torch's fp32 mean, whose summation order depends on
the device (a few ulps; tests/test_quant.py bounds it). Everything else — the NF4 bytes, the
scales given the same mean, and every dequantisation, in NumPy and inside jitted layers — is
bit for bit.
"""

from __future__ import annotations

import base64
import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
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


def _lut() -> np.ndarray:
  """bitsandbytes' CPU lookup table (csrc/cpu_ops.cpp, `build_quantize_lut`): for each of 65536
  points evenly spaced over [-1, 1], the index of the dynamic-map entry whose midpoint interval
  holds it, computed in fp32 as there."""
  code = dynamic_map()
  mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
  grid = (np.float32(-1) + (np.float32(2) * np.arange(LUT, dtype=np.float32))
          / np.float32(LUT - 1)).astype(np.float32)
  return np.searchsorted(mid, grid, side="left").astype(np.uint8)


LUT = 65536
_LUT = _lut()


def quantize_blockwise8(x: np.ndarray, blocksize: int = BLOCK2, kernel: str = "cpu"
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """bitsandbytes' `quantize_blockwise` with its signed dynamic map: (bytes, absmax, code).

  Values are multiplied by the reciprocal of their block's absmax. bitsandbytes' two kernels
  then choose the byte differently, and `kernel` says whose to follow: `cpu` rounds the value to
  the nearest of 65536 grid points over [-1, 1] and looks its entry up in a table (so a value
  within about 2e-5 of the midpoint of two entries may take the farther one); `cuda` takes the
  nearest entry by binary search (ties to the lower)."""
  code = dynamic_map()
  blocks, absmax = _blocks(np.asarray(x, np.float32).reshape(-1), blocksize)
  with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero block: 0 * inf
    inv = (np.float32(1) / absmax).astype(np.float32)
    normed = (blocks * inv[:, None]).reshape(-1)[:x.size]
  zero = ~np.isfinite(normed)  # an all-zero block: bitsandbytes writes index 0
  normed = np.where(zero, np.float32(0), normed)
  if kernel == "cpu":
    clipped = np.clip(normed, np.float32(-1), np.float32(1))
    point = (((clipped + np.float32(1)) * np.float32(0.5)) * np.float32(LUT - 1)
             + np.float32(0.5)).astype(np.float32)
    out = _LUT[point.astype(np.int64)]
  else:
    left = np.clip(np.searchsorted(code, normed, side="right") - 1, 0, 255)
    right = np.minimum(left + 1, 255)
    closer = np.abs(normed - code[right]) < np.abs(normed - code[left])
    out = np.where(closer, right, left)
  return np.where(zero, 0, out).astype(np.uint8), absmax, code


def quantize_nf4(w: np.ndarray, double: bool = True, offset: Optional[float] = None,
                 kernel: str = "cpu") -> NF4State:
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
  qabs, absmax2, code2 = quantize_blockwise8(absmax - offset, kernel=kernel)
  return NF4State(packed, qabs, tuple(w.shape), offset, absmax2, code2)


def _scales(xp, absmax, absmax2, offset, code2, n: int):
  """The fp32 scale of each NF4 block: `absmax` itself, or its double-quantised form."""
  if absmax2 is None:
    return absmax
  idx = xp.arange(n) // BLOCK2
  scaled = code2[absmax.astype(xp.int32)] * absmax2[idx]
  return xp.where(xp.isnan(scaled), xp.float32(0), scaled) + offset  # no fused multiply-add


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


# ---- on the device ---------------------------------------------------------------------------

KINDS = ("nf4", "int8")
_CODE2 = dynamic_map()


@flax.struct.dataclass
class QuantKernel:
  """A frozen weight matrix as it lives in device memory under `peft.base_quant`: the state
  bitsandbytes keeps for the matrix in its (rows, cols) = (out, in) layout, with each row's
  blocks on their own row (so the blocks shard with the rows of their layer on a mesh).

  It stands where the parameter would be in the tree (`layers_0/mlp/up_proj/kernel`); the layer
  dequantises it for its matmul (`models.layers.matmul`), and `value` gives the parameter itself:
  the transpose of the matrix for a dense kernel (in, out), the matrix for an embedding table.

  Attributes:
    data: nf4: (rows, cols/2) uint8, two code indices per byte (the first in the high nibble);
      int8: (rows, cols) int8.
    absmax: nf4: each block's scale, (rows, cols/64) fp32, or uint8 under double quantisation;
      int8: (rows,) fp32.
    absmax2, offset: double quantisation's second-level scales (blocks of 256 over the
      flattened `absmax`) and the mean subtracted before them; None without.
  """

  data: jax.Array
  absmax: jax.Array
  absmax2: Optional[jax.Array] = None
  offset: Optional[jax.Array] = None
  kind: str = flax.struct.field(pytree_node=False, default="nf4")
  transposed: bool = flax.struct.field(pytree_node=False, default=True)

  @property
  def matrix_shape(self) -> tuple[int, int]:
    rows, cols = self.data.shape
    return (rows, cols * 2) if self.kind == "nf4" else (rows, cols)

  @property
  def shape(self) -> tuple[int, int]:
    """The shape of the parameter it stands for."""
    rows, cols = self.matrix_shape
    return (cols, rows) if self.transposed else (rows, cols)

  @property
  def dtype(self):
    """The dtype of the parameter it stands for (its dequantised values are fp32)."""
    return jnp.dtype(jnp.float32)

  @property
  def nbytes(self) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(self))

  def scales(self) -> jax.Array:
    """Each block's fp32 scale (nf4: (rows, cols/64)), as bitsandbytes dequantises it."""
    if self.absmax2 is None:
      return self.absmax
    n = int(np.prod(self.absmax.shape))
    second = jnp.repeat(self.absmax2, BLOCK2)[:n].reshape(self.absmax.shape)
    scaled = jnp.asarray(_CODE2)[self.absmax.astype(jnp.int32)] * second
    # A select between the product and the sum keeps XLA from contracting them into one fused
    # multiply-add, which rounds once where bitsandbytes rounds twice (never NaN: a no-op).
    scaled = jnp.where(jnp.isnan(scaled), jnp.float32(0), scaled)
    return scaled + self.offset

  def matrix(self, dtype=jnp.float32, rows: Optional[jax.Array] = None) -> jax.Array:
    """The dequantised (rows, cols) matrix (or only the rows `rows`), in `dtype`: the fp32
    values bitsandbytes' dequantisation gives, then rounded to `dtype`."""
    data, scales = self.data, self.scales()
    if rows is not None:
      data, scales = jnp.take(data, rows, axis=0), jnp.take(scales, rows, axis=0)
    if self.kind == "int8":
      return (data.astype(jnp.float32) * scales[..., None]
              * jnp.float32(7.874015718698502e-3)).astype(dtype)
    idx = jnp.stack([data >> 4, data & 15], axis=-1).astype(jnp.int32)
    values = jnp.asarray(NF4, jnp.float32)[idx].reshape(*scales.shape, BLOCK)
    return (values * scales[..., None]).reshape(*data.shape[:-1], -1).astype(dtype)

  def value(self, dtype=jnp.float32) -> jax.Array:
    """The dequantised parameter (a dense kernel (in, out), or an embedding table)."""
    m = self.matrix(dtype)
    return m.T if self.transposed else m




def quantize(matrix: np.ndarray, kind: str, double: bool = True, transposed: bool = True,
             where: str = "", kernel: str = "cpu") -> QuantKernel:
  """A (rows, cols) = (out, in) matrix quantised on the host as bitsandbytes does (NumPy arrays
  in the result: the caller places them). nf4 needs cols to be a multiple of 64, so that no
  block spans two rows (true of every released model's linear layers)."""
  matrix = np.asarray(matrix, np.float32)
  rows, cols = matrix.shape
  if kind == "int8":
    s = quantize_int8(matrix)
    return QuantKernel(s.q, s.absmax, kind=kind, transposed=transposed)
  if cols % BLOCK:
    raise ValueError(f"{where}: NF4 needs an input width that is a multiple of {BLOCK} "
                     f"(this matrix is {rows}x{cols})")
  s = quantize_nf4(matrix, double, kernel=kernel)
  absmax = s.absmax.reshape(rows, cols // BLOCK)
  if not double:
    return QuantKernel(s.packed.reshape(rows, cols // 2), absmax, kind=kind,
                       transposed=transposed)
  return QuantKernel(s.packed.reshape(rows, cols // 2), absmax, s.absmax2, np.float32(s.offset),
                     kind=kind, transposed=transposed)


def nf4_state(q: QuantKernel) -> NF4State:
  """The flat bitsandbytes state of an NF4 `QuantKernel` (host arrays)."""
  rows, cols = q.matrix_shape
  packed, absmax = np.asarray(q.data).reshape(-1), np.asarray(q.absmax).reshape(-1)
  if q.absmax2 is None:
    return NF4State(packed, absmax, (rows, cols))
  return NF4State(packed, absmax, (rows, cols), np.float32(q.offset), np.asarray(q.absmax2),
                  dynamic_map())


def dequantize_tree(flat: dict, dtype=jnp.float32) -> dict:
  """`flat` with every `QuantKernel` replaced by its dequantised parameter."""
  return {p: v.value(dtype) if isinstance(v, QuantKernel) else v for p, v in flat.items()}


__all__ = ["NF4", "BLOCK", "BLOCK2", "NF4State", "Int8State", "QuantKernel", "dynamic_map",
           "quantize_nf4", "dequantize_nf4", "quantize_blockwise8", "quantize_int8",
           "dequantize_int8", "quantize", "nf4_state", "dequantize_tree"]
