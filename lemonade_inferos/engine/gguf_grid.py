"""One GGUF weight matrix as a ``MatMulNBits`` payload: the file's own grid where it fits, else requantized.

llama.cpp's ``Q4_0`` block is 32 weights ``d * (q - 8)`` with one fp16 scale ``d`` and 4-bit ``q``: exactly a
4-bit ``MatMulNBits`` block of 32 with zero point 8. ``Q8_0`` (``d * q``, 8-bit ``q``), ``Q5_0`` (``d * (q - 16)``,
5-bit ``q``) and ``Q6_K`` (16-weight sub-blocks ``d * s * (q - 32)``, 6-bit ``q``) are exactly 8-bit blocks with
zero point 128. Those tensors are carried over code for code in every build, so the built model computes with the
weights llama-server computes with, and never holds them as floats: llama.cpp's quantizer keeps the sensitive
tensors (the output matrix, V, half the down projections) at 6 or 8 bits, and requantizing a Q6_K output matrix
of a 1B model to 4 bits moved its next-token distribution by KLD 0.053, against 0.001 kept as it was. Types whose blocks carry a float minimum (``Q4_1``,
``Q4_K``, ``Q5_K``, ...: ``MatMulNBits`` takes a float zero point, but its CPU kernel then runs ~100x slower)
and float tensors are dequantized one row chunk at a time and requantized by ONNX Runtime's own block quantizer
(asymmetric, blocks of 32), at the bits the build asks for.

A :class:`QuantizedLinear` keeps its arrays with the output rows first, so a row permutation or a split of a fused
matrix is plain row indexing; :meth:`QuantizedLinear.module` hands the builder the attributes it reads from a
pre-quantized (AWQ/GPTQ-style) linear layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

ROW_CHUNK = 4096   # rows dequantized at once: a chunk of a 128K-vocab embedding is 64 MB of fp32 at 4096 wide


@dataclass(frozen=True)
class Grid:
    """How one GGML type's blocks map onto ``MatMulNBits`` blocks: ``block`` weights share ``scale(blocks)``."""

    bits: int
    block: int
    scale: object   # raw GGML blocks (uint8 [n, type_size]) -> float32 scales [n, type_block // block]


def _fp16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)


def _q6_k_scales(raw: np.ndarray) -> np.ndarray:
    # Q6_K: ql[128] qh[64] scales int8[16] d fp16
    return _fp16(raw[:, 208:210]) * np.ascontiguousarray(raw[:, 192:208]).view(np.int8).astype(np.float32)


EXACT_GRIDS = {   # GGML type name -> its grid as MatMulNBits blocks
    "Q4_0": Grid(bits=4, block=32, scale=lambda raw: _fp16(raw[:, 0:2])),
    "Q5_0": Grid(bits=8, block=32, scale=lambda raw: _fp16(raw[:, 0:2])),
    "Q8_0": Grid(bits=8, block=32, scale=lambda raw: _fp16(raw[:, 0:2])),
    "Q6_K": Grid(bits=8, block=16, scale=_q6_k_scales),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass
class QuantizedLinear:
    """A weight matrix [out_features, in_features] as MatMulNBits blocks: ``qweight`` uint8 [N, blocks, bytes],
    ``scales`` float32 [N, blocks], ``zero_points`` uint8 [N, blocks] (one per block, unpacked), and how it was made
    (``exact``: the file's own codes)."""

    qweight: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray
    bits: int
    block: int
    exact: bool

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * self.block

    def rows(self, index: np.ndarray | slice) -> "QuantizedLinear":
        """The same matrix restricted to (or reordered by) output rows ``index``."""
        return QuantizedLinear(self.qweight[index], self.scales[index], self.zero_points[index], self.bits,
                               self.block, self.exact)

    def dequantize(self) -> np.ndarray:
        """The float32 matrix the blocks stand for (what ``MatMulNBits`` multiplies by)."""
        codes = unpack_codes(self.qweight, self.bits).astype(np.float32)
        values = (codes - self.zero_points[..., None].astype(np.float32)) * self.scales[..., None]
        return values.reshape(self.out_features, self.in_features)

    def module(self, bias=None):
        """An object with the attributes onnxruntime-genai's builder reads from a pre-quantized linear layer."""
        import torch

        return SimpleNamespace(
            qweight=torch.from_numpy(np.ascontiguousarray(self.qweight)),
            scales=torch.from_numpy(np.ascontiguousarray(self.scales)),   # [N, blocks]: GatherBlockQuantized
            qzeros=torch.from_numpy(pack_zero_points(self.zero_points, self.bits)),   # reads them with N first
            bits=self.bits, group_size=self.block, in_features=self.in_features, out_features=self.out_features,
            g_idx=None, bias=bias)


def unpack_codes(qweight: np.ndarray, bits: int) -> np.ndarray:
    """``MatMulNBits`` bytes [N, blocks, bytes] -> codes [N, blocks, block] (4-bit: low nibble first)."""
    if bits == 8:
        return qweight
    return np.stack([qweight & 0x0F, qweight >> 4], axis=-1).reshape(*qweight.shape[:-1], -1)


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        return codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def pack_zero_points(zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Per-block zero points as ``MatMulNBits`` stores them: 4-bit ones two to a byte, each row padded to bytes."""
    if bits == 8:
        return zero_points.astype(np.uint8)
    if zero_points.shape[1] % 2:
        zero_points = np.pad(zero_points, ((0, 0), (0, 1)))
    return (zero_points[:, 0::2] | (zero_points[:, 1::2] << 4)).astype(np.uint8)


def block_layout(type_name: str, bits: int) -> tuple[int, int]:
    """The (bits, block) a tensor of this GGML type becomes in a build of ``bits``, read from no data."""
    grid = EXACT_GRIDS.get(type_name)
    return (grid.bits, grid.block) if grid is not None else (bits, 32)


def quantized_linear(raw: np.ndarray, type_name: str, shape: tuple[int, int], bits: int) -> QuantizedLinear:
    """A GGUF tensor's data (``GGUFReader``'s ``tensor.data``), its GGML type name and its [out, in] shape -> blocks:
    the file's own grid for the types in :data:`EXACT_GRIDS`, else requantized to ``bits`` (4 or 8)."""
    grid = EXACT_GRIDS.get(type_name)
    chunks = [_exact_rows(raw[i:i + ROW_CHUNK], type_name, grid, shape[1]) if grid is not None
              else _requantized_rows(raw[i:i + ROW_CHUNK], type_name, shape[1], bits)
              for i in range(0, shape[0], ROW_CHUNK)]
    return QuantizedLinear(*(np.concatenate([c[k] for c in chunks]) for k in range(3)),
                           bits=grid.bits if grid else bits, block=grid.block if grid else 32, exact=grid is not None)


def dequantized(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A GGUF tensor as float32 in its [out, in] (or 1-D) shape."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    values = np.ascontiguousarray(dequantize(np.asarray(raw), GGMLQuantizationType[type_name]), dtype=np.float32)
    if not values.flags.writeable:   # an F32 tensor is a view of the read-only memory map
        values = values.copy()
    return values.reshape(shape)


def _exact_rows(raw: np.ndarray, type_name: str, grid: Grid, width: int):
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    rows = raw.shape[0]
    type_block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    scales = grid.scale(raw.reshape(-1, type_size)).reshape(rows, width // grid.block)
    values = dequantized(raw, type_name, (rows, width)).reshape(rows, -1, grid.block)
    zero_point = 1 << (grid.bits - 1)
    safe = np.where(scales == 0, 1.0, scales)[..., None]
    codes = np.rint(values / safe).astype(np.int32) + zero_point
    if codes.min() < 0 or codes.max() >= (1 << grid.bits):
        raise ValueError(f"{type_name} codes fall outside {grid.bits} bits: the file's blocks are not as expected")
    return pack_codes(codes.astype(np.uint8), grid.bits), scales, np.full(scales.shape, zero_point, np.uint8)


def _requantized_rows(raw: np.ndarray, type_name: str, width: int, bits: int):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows = raw.shape[0]
    if width % 32:
        raise ValueError(f"a {type_name} matrix {width} wide is not whole blocks of 32")
    transposed = np.ascontiguousarray(dequantized(raw, type_name, (rows, width)).T)   # [K, N], as ORT takes it
    blocks = width // 32
    packed = np.zeros((rows, blocks, 32 * bits // 8), np.uint8)
    scales = np.zeros((rows, blocks), np.float32)
    zero_points = np.zeros((rows, (blocks + 1) // 2 if bits == 4 else blocks), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, transposed, scales, zero_points, 32, rows, width, False)
    if bits == 4:
        zero_points = unpack_codes(zero_points[..., None], 4).reshape(rows, -1)[:, :blocks]
    return packed, scales, zero_points
