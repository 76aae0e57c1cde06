"""A GGUF weight matrix becomes MatMulNBits blocks: llama.cpp's own codes where its grid is one (Q4_0, Q5_0, Q8_0,
Q6_K), requantized by ONNX Runtime's block quantizer where it is not, and row operations keep the blocks."""

from __future__ import annotations

import numpy as np
import pytest

from lemonade_inferos.engine.build import BUILTIN_MODELS
from lemonade_inferos.engine.gguf_grid import (dequantized, pack_zero_points, quantized_linear, unpack_codes)
from lemonade_inferos.engine.gguf_weights import unpermuted_rows
from tests.gguf_files import _llama_cpp_rows


def _quantized(type_name: str, rows: int = 96, width: int = 256, seed: int = 0) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    weights = np.random.default_rng(seed).normal(0, 0.02, (rows, width)).astype(np.float32)
    weights[0, :32] += 0.05   # one block not centred on zero
    return quantize(weights, GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name, bits, block", [("Q4_0", 4, 32), ("Q5_0", 8, 32), ("Q8_0", 8, 32)])
def test_a_type_with_a_blocks_grid_is_carried_over_code_for_code(type_name, bits, block):
    raw = _quantized(type_name)
    linear = quantized_linear(raw, type_name, (96, 256), bits=4)
    assert linear.exact and (linear.bits, linear.block) == (bits, block)
    assert np.array_equal(linear.dequantize(), dequantized(raw, type_name, (96, 256)))


def test_q6_k_tensors_of_a_real_file_are_carried_over_code_for_code():
    from gguf import GGUFReader

    reader = GGUFReader(str(BUILTIN_MODELS["gemma3-270m"].locate()))
    tensor = next(t for t in reader.tensors if t.tensor_type.name == "Q6_K" and len(t.shape) == 2)
    shape = (int(tensor.shape[1]), int(tensor.shape[0]))
    linear = quantized_linear(tensor.data, "Q6_K", shape, bits=4)
    assert linear.exact and (linear.bits, linear.block) == (8, 16)
    assert np.array_equal(linear.dequantize(), dequantized(tensor.data, "Q6_K", shape))


def test_a_type_with_a_float_minimum_is_requantized_at_the_bits_asked():
    raw = _quantized("Q4_1")
    source = dequantized(raw, "Q4_1", (96, 256))
    errors = {}
    for bits in (4, 8):
        linear = quantized_linear(raw, "Q4_1", (96, 256), bits=bits)
        assert not linear.exact and (linear.bits, linear.block) == (bits, 32)
        errors[bits] = np.sqrt(np.mean((linear.dequantize() - source) ** 2) / np.mean(source ** 2))
    assert errors[4] < 0.1 and errors[8] < errors[4] / 8


def test_reordering_rows_keeps_each_rows_blocks():
    raw = _quantized("Q4_0")
    linear = quantized_linear(raw, "Q4_0", (96, 256), bits=4)
    order = np.random.default_rng(1).permutation(96)
    assert np.array_equal(linear.rows(order).dequantize(), linear.dequantize()[order])
    assert np.array_equal(linear.rows(slice(10, 20)).dequantize(), linear.dequantize()[10:20])


def test_unpermuted_rows_undo_llama_cpps_q_k_row_order():
    heads, head_size = 4, 8
    hf = np.arange(heads * head_size * 3, dtype=np.float32).reshape(heads * head_size, 3)
    file_rows = _llama_cpp_rows(hf, heads)
    assert not np.array_equal(file_rows, hf)
    assert np.array_equal(file_rows[unpermuted_rows(heads * head_size, heads)], hf)


def test_four_bit_zero_points_pack_two_to_a_byte_and_unpack_back():
    zero_points = np.random.default_rng(2).integers(0, 16, (5, 7)).astype(np.uint8)   # an odd count per row
    packed = pack_zero_points(zero_points, 4)
    assert packed.shape == (5, 4)
    assert np.array_equal(unpack_codes(packed[..., None], 4).reshape(5, -1)[:, :7], zero_points)


def test_a_tensor_the_converter_does_not_know_stops_the_conversion_naming_it(tmp_path):
    from collections import Counter

    from gguf import GGUFWriter

    from lemonade_inferos.engine.gguf_weights import Dims, UnknownTensorError, load_for_builder

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    writer.add_tensor("blk.0.attn_mystery.weight", np.zeros((32, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnknownTensorError, match="blk.0.attn_mystery.weight"):
        load_for_builder(path, 4, Dims(8, 32, 64, 4, 2, 8), Counter())
