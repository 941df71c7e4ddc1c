"""Block-wise symmetric weight-only quantization of one [K, N] MatMul weight (K = input features), in numpy.

One quantized weight set — signed ints q [K, N] and fp16 scales [ceil(K / block), N] with w ≈ q * scale — from
which both graph forms are written (weight_only.py): ONNX `DequantizeLinear` (opset 21, `block_size`) and onnxruntime's
`MatMulNBits`. Scales are rounded to fp16 *before* rounding the weights, so the fp16 and fp32 graphs dequantize to
the same values. Two methods: round-to-nearest, and GPTQ (Frantar et al. 2022), which rounds input rows one at a
time and spreads each row's error over the rows not yet rounded, weighted by the calibration activations' second
moment H = Σ xᵀx.

`MatMulNBits` storage (onnxruntime docs/ContribOperators.md, com.microsoft.MatMulNBits): B is uint8
[N, ceil(K / block), block * bits / 8]; each column's block holds q + 2^(bits-1) (the op's default zero point when
none is given), for 4 bits two per byte, the even element of a pair in the low nibble.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.errors import InputError

BITS = (4, 8)
BLOCK_SIZES = (32, 64, 128)
_FP16_TINY = np.float16(np.finfo(np.float16).tiny)


@dataclass(frozen=True, eq=False)
class BlockQuantized:
    q: np.ndarray  # int8 [K, N], values in [-2^(bits-1), 2^(bits-1) - 1]
    scales: np.ndarray  # float16 [ceil(K / block_size), N]; a last, partial block has its own scale
    bits: int
    block_size: int

    def dequantize(self, dtype: np.dtype = np.float32) -> np.ndarray:
        return (self.q.astype(np.float32) * per_row(self.scales, self.block_size, len(self.q))).astype(dtype)


def per_row(scales: np.ndarray, block_size: int, k: int) -> np.ndarray:
    """[ceil(K / block), N] block scales → [K, N] float32, one row per input feature."""
    return np.repeat(scales.astype(np.float32), block_size, axis=0)[:k]


def _blocks(k: int, block_size: int) -> int:
    return -(-k // block_size)


def check_shape(shape: tuple[int, ...], bits: int, block_size: int, name: str = "weight") -> None:
    if bits not in BITS:
        raise InputError(f"bits={bits}: expected one of {list(BITS)}")
    if block_size not in BLOCK_SIZES:
        raise InputError(f"block_size={block_size}: expected one of {list(BLOCK_SIZES)}")
    if len(shape) != 2 or min(shape) < 1:
        raise InputError(f"{name}: shape {list(shape)} is not a non-empty 2-D [in, out] matrix")


def block_scales(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """fp16 scale per (block of input rows, output column): max|w| / (2^(bits-1) - 1), never 0. A partial last
    block (K not a multiple of block_size) is padded with zeros, as both graph forms define it."""
    k, n = w.shape
    padded = np.zeros((_blocks(k, block_size) * block_size, n), np.float32)
    padded[:k] = w
    absmax = np.abs(padded.reshape(-1, block_size, n)).max(axis=1)
    return np.maximum((absmax / (2 ** (bits - 1) - 1)).astype(np.float16), _FP16_TINY)


def channel_scales(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """One fp16 scale per output column (max|w| over all K inputs), repeated into every block: per-channel
    quantization in the blocked layout, so MatMulNBits (blocked) and a per-axis DequantizeLinear — the only int8
    weight form TensorRT imports — hold the same weights."""
    return np.repeat(block_scales(w, bits, len(w)), _blocks(len(w), block_size), axis=0)


def _round(w: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    return np.clip(np.rint(w / scale.astype(np.float32)), lo, hi).astype(np.int8)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, name: str = "weight",
                 per_channel: bool = False) -> BlockQuantized:
    """`per_channel`: every block of a column shares the column's scale (channel_scales)."""
    check_shape(w.shape, bits, block_size, name)
    w32 = np.asarray(w, dtype=np.float32)
    scales = (channel_scales if per_channel else block_scales)(w32, bits, block_size)
    return BlockQuantized(_round(w32, per_row(scales, block_size, len(w32)), bits), scales, bits, block_size)


def quantize_gptq(w: np.ndarray, hessian: np.ndarray | list[np.ndarray], bits: int, block_size: int,
                  damp: float = 0.01, name: str = "weight", per_channel: bool = False) -> BlockQuantized:
    """GPTQ in activation order with static groups: each block's scale is fixed up front (as RTN would pick it),
    then input rows are rounded from the most to the least active one (descending diag H), each row's error
    spread over the rows not yet rounded — the GPTQ reference's `act_order` + `static_groups`, which keeps the
    contiguous blocks both graph forms need.

    `hessian` is Σ xᵀx [K, K] over the calibration tokens that reach this weight; `damp` × mean(diag) is added
    for numerical stability (the paper's 1%). Input features never seen (zero diagonal) are zeroed, as in GPTQ.
    `per_channel`: one scale per column in every block (channel_scales); rows are still batched by `block_size`.
    `hessian` given as a one-element list is handed over: the list is emptied once the permuted copy is made (the
    solve never needs the original again), so a caller holding no other reference frees it before the solve.
    """
    box = hessian if isinstance(hessian, list) else [hessian]
    hessian = box[0]
    check_shape(w.shape, bits, block_size, name)
    k, n = w.shape
    if hessian.shape != (k, k):
        raise InputError(f"{name}: hessian {list(hessian.shape)} does not match {k} input features")
    # Memory (issue #24): at Vicuna-7B's down_proj (K = 11008) each [K, K] float64 array is 0.97 GB, and
    # np.linalg.inv holds four (its argument, two LAPACK buffers, the result). So nothing else [K, K] is alive
    # then — the caller's H is released after the permuted copy — and the float64 W [K, N] is made after the
    # factorisation. The values are those of the textbook sequence exactly (same operations, same order).
    diag = np.diag(hessian).astype(np.float64)
    dead = diag == 0
    diag[dead] = 1.0
    # the scales see w with the dead rows zeroed, in float32 (as block_scales rounds any input): the values of the
    # float64 working copy, at half its size
    w32 = np.array(w, dtype=np.float32)
    w32[dead, :] = 0.0
    scales = (channel_scales if per_channel else block_scales)(w32, bits, block_size)
    del w32
    perm = np.argsort(-diag, kind="stable")
    H = np.asarray(hessian)[np.ix_(perm, perm)].astype(np.float64, copy=False)
    del hessian
    box.clear()
    H[np.flatnonzero(dead[perm]), np.flatnonzero(dead[perm])] = 1.0
    H[np.diag_indices(k)] += damp * np.mean(np.diag(H))
    # Upper Cholesky factor of H⁻¹: row i holds the weights that spread row i's rounding error over rows > i.
    H = np.linalg.inv(H)
    U = np.linalg.cholesky(H).T
    del H
    W = _permuted_float64_rows(w, dead, perm)
    # each row's scales, looked up as the row comes (a [K, N] float64 table is 1.05 GB at lm_head): float16 ->
    # float64 is exact, so the values are per_row's
    scales64 = scales.astype(np.float64)
    q = np.zeros((k, n), np.int8)
    lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    for b0 in range(0, k, block_size):  # lazy batches of rows (in activation order)
        b1 = min(b0 + block_size, k)
        err = np.zeros((b1 - b0, n))
        for i in range(b0, b1):
            row_scale = scales64[perm[i] // block_size]
            q[i] = np.clip(np.rint(W[i] / row_scale), lo, hi)
            e = (W[i] - q[i] * row_scale) / U[i, i]
            W[i + 1:b1] -= np.outer(U[i, i + 1:b1], e)
            err[i - b0] = e
        W[b1:] -= U[b0:b1, b1:].T @ err
    out = np.empty_like(q)
    out[perm] = q
    return BlockQuantized(out, scales, bits, block_size)


def _permuted_float64_rows(w: np.ndarray, dead: np.ndarray, perm: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """GPTQ's working copy of the weight: `w[perm]` as float64, the rows of never-seen inputs zeroed — filled a few
    rows at a time, so that no second [K, N] float64 array exists while it is made."""
    src = np.asarray(w)
    W = np.empty(src.shape, np.float64)
    for r0 in range(0, len(perm), chunk):
        W[r0:r0 + chunk] = src[perm[r0:r0 + chunk]]
    W[dead[perm], :] = 0.0
    return W


# ------------------------------------------------------------------------------------------- MatMulNBits packing
def pack_matmul_nbits(bq: BlockQuantized) -> np.ndarray:
    """uint8 [N, ceil(K / block), block * bits / 8] as MatMulNBits reads it (see the module docstring); a partial
    last block is padded with the zero point (value 0)."""
    k, n = bq.q.shape
    blocks = _blocks(k, bq.block_size)
    u = np.full((n, blocks * bq.block_size), 2 ** (bq.bits - 1), np.uint8)
    u[:, :k] = (bq.q.astype(np.int16) + 2 ** (bq.bits - 1)).astype(np.uint8).T  # offset by the zero point
    u = u.reshape(n, blocks, bq.block_size)
    if bq.bits == 8:
        return np.ascontiguousarray(u)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack_matmul_nbits(packed: np.ndarray, bits: int, k: int, n: int, block_size: int) -> np.ndarray:
    """Inverse of pack_matmul_nbits: signed int8 [K, N]."""
    blocks = _blocks(k, block_size)
    expected = (n, blocks, block_size * bits // 8)
    if packed.shape != expected or packed.dtype != np.uint8:
        raise InputError(f"packed MatMulNBits weight is {packed.dtype}{list(packed.shape)}; expected "
                         f"uint8{list(expected)} for K={k}, N={n}, bits={bits}, block_size={block_size}")
    if bits == 8:
        u = packed
    else:
        u = np.empty((n, blocks, block_size), np.uint8)
        u[..., 0::2] = packed & 0x0F
        u[..., 1::2] = packed >> 4
    return (u.reshape(n, -1)[:, :k].astype(np.int16) - 2 ** (bits - 1)).astype(np.int8).T
