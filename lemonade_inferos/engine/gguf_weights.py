"""A GGUF file as the model object onnxruntime-genai's builder walks, its matrices already ``MatMulNBits`` blocks.

The builder reads weights from a transformers model, or from a GGUF through its own loader, which takes only
unquantized files. Both hold every weight as floats: converting a 1B model that way peaked at 10.5 GB. This loader
gives the builder the builder's own GGUF module classes, filled from the memory-mapped file one tensor at a time:
each linear layer carries ``qweight``/``scales``/``qzeros`` (gguf_grid.py), which the builder emits as a
``MatMulNBits`` node as it stands, the way it emits a pre-quantized AWQ/GPTQ layer. The token embedding is blocks
too: the builder gathers a tied one from the output matrix's blocks, and an untied one is handed over as a
placeholder table on the meta device (never materialized) with its blocks beside it (``embedding.blocks``), which
og_builder.py puts under a ``GatherBlockQuantized`` in place of the builder's float ``Gather``. Only the norms (and
everything in an fp32 build) are floats.

What llama.cpp's converter changed is undone here: Q/K rows of Llama-family models are permuted for its RoPE
(reordering rows keeps the blocks, which run along a row), Phi-3's fused QKV and gate/up matrices are split by rows,
and Gemma's norms already carry their +1 (the builder adds none for a GGUF).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lemonade_inferos.engine.gguf_grid import QuantizedLinear, block_layout, dequantized, quantized_linear

PERMUTED_ARCHITECTURES = ("llama", "mistral", "granite", "olmo")   # Q/K rows interleaved for llama.cpp's RoPE
LINEAR_TENSORS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                  "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                  "ffn_down": "mlp.down_proj", "attn_qkv": "fused_qkv"}
NORM_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
GEMMA_NORM_TENSORS = {**NORM_TENSORS, "ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm",
                      "post_ffw_norm": "post_feedforward_layernorm"}
SKIPPED = ("rope_freqs.weight", "rope_factors_short.weight", "rope_factors_long.weight")   # RoPE, read by og_builder.py and gguf_export.py


class UnknownTensorError(ValueError):
    """A tensor this loader does not know where to put: converting without it would build a wrong model."""


@dataclass(frozen=True)
class Dims:
    """The sizes the builder read from the config (in the order its loader is given them), which the file's
    tensors are cut by."""

    head_size: int
    hidden_size: int
    intermediate_size: int
    num_attn_heads: int
    num_kv_heads: int
    vocab_size: int


def load_for_builder(path: str | Path, bits: int, dims: Dims, report: Counter) -> Any:
    """The builder's ``GGUFModel`` for ``path``, linear layers as blocks of ``bits`` (4 or 8; 32: floats).
    ``report`` counts, per GGML type, how its tensors went in (``Q4_0 exact``, ``Q4_K int4``, ``F32 float``)."""
    from gguf import GGUFReader
    from onnxruntime_genai.models.loaders.gguf import GGUFModel, GGUFTensorModule

    reader = GGUFReader(str(path))
    architecture = str(reader.get_field("general.architecture").contents())
    norms = GEMMA_NORM_TENSORS if architecture.startswith("gemma") else NORM_TENSORS
    model = GGUFModel.__new__(GGUFModel)
    model.embedding, model.final_norm, model.lm_head = GGUFTensorModule(), GGUFTensorModule(), GGUFTensorModule()
    layers: dict[int, dict[str, Any]] = {}
    for tensor in reader.tensors:
        if tensor.name in SKIPPED:
            continue
        if not tensor.name.startswith("blk."):
            _top_level(model, tensor, bits, dims, report)
            continue
        _, layer, role, kind = tensor.name.split(".", 3)
        layers.setdefault(int(layer), {})[f"{role}.{kind}"] = tensor
    if getattr(model.lm_head, "weight", None) is None and not hasattr(model.lm_head, "qweight"):   # tied
        model.lm_head = _linear_module(model.embedding.blocks, None)   # the embedding's blocks
    permuted = architecture in PERMUTED_ARCHITECTURES
    model.layers = [_layer(i, layers[i], bits, dims, norms, permuted, report) for i in sorted(layers)]
    return model


def _top_level(model: Any, tensor: Any, bits: int, dims: Dims, report: Counter) -> None:
    import torch

    if tensor.name == "token_embd.weight":
        blocks = _rows(_linear(tensor, bits, report), slice(0, dims.vocab_size))
        if isinstance(blocks, np.ndarray):   # an fp32 build
            model.embedding.weight, model.embedding.blocks = torch.from_numpy(blocks), blocks
        else:
            model.embedding.weight = torch.empty((blocks.out_features, blocks.in_features), device="meta")
            model.embedding.blocks = blocks
    elif tensor.name == "output.weight":
        model.lm_head = _linear_module(_rows(_linear(tensor, bits, report), slice(0, dims.vocab_size)), None)
    elif tensor.name in ("output_norm.weight", "output_norm.bias", "output.bias"):
        module = model.final_norm if tensor.name.startswith("output_norm") else model.lm_head
        setattr(module, tensor.name.rsplit(".", 1)[1], torch.from_numpy(_float(tensor)))
    else:
        raise UnknownTensorError(f"{tensor.name}: a tensor the GGUF converter does not know; the file is not "
                                 "converted (a model without it would be wrong)")


def _layer(layer_id: int, tensors: dict[str, Any], bits: int, dims: Dims, norms: dict[str, str], permuted: bool,
           report: Counter) -> Any:
    import torch
    from onnxruntime_genai.models.loaders.gguf import GGUFDecoderLayer, GGUFTensorModule

    layer = GGUFDecoderLayer(layer_id)
    layer.self_attn.q_norm, layer.self_attn.k_norm = GGUFTensorModule(), GGUFTensorModule()
    linears: dict[str, tuple[Any, np.ndarray | None]] = {}
    for key, tensor in tensors.items():
        role, kind = key.split(".")
        if role in LINEAR_TENSORS and kind == "weight":
            bias = tensors.get(f"{role}.bias")
            linears[LINEAR_TENSORS[role]] = (_linear(tensor, bits, report), None if bias is None else _float(bias))
        elif role in norms:
            _set(layer, norms[role], kind, torch.from_numpy(_float(tensor)))
        elif not (role in LINEAR_TENSORS and kind == "bias"):
            raise UnknownTensorError(f"blk.{layer_id}.{key}: a tensor the GGUF converter does not know; the file "
                                     "is not converted (a model without it would be wrong)")
    for name, (weight, bias) in _split_fused(linears, dims).items():
        if permuted and name in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = dims.num_attn_heads if name == "self_attn.q_proj" else dims.num_kv_heads
            index = unpermuted_rows(_out_features(weight), heads)
            weight, bias = _rows(weight, index), None if bias is None else bias[index]
        _assign(layer, name, _linear_module(weight, bias))
    return layer


def qkv_layouts_agree(path: str | Path, bits: int) -> bool:
    """Whether every layer's Q, K and V come out as blocks of one layout, so the builder may pack them into one
    ``MatMulNBits`` (it refuses to pack mixed ones: Q4_K_M files keep V in Q6_K, which an int8 build carries as
    blocks of 16)."""
    from gguf import GGUFReader

    layouts: dict[str, set[tuple[int, int]]] = {}
    for tensor in GGUFReader(str(path)).tensors:
        parts = tensor.name.split(".")
        if len(parts) == 4 and parts[2] in ("attn_q", "attn_k", "attn_v") and parts[3] == "weight":
            layouts.setdefault(parts[1], set()).add(block_layout(tensor.tensor_type.name, bits))
    return bits == 32 or all(len(found) == 1 for found in layouts.values())


def unpermuted_rows(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's Q/K permutation: in each head the file interleaves the two rotary
    halves (row 2i is Hugging Face's row i, row 2i+1 its row i + head_size/2)."""
    return np.arange(rows).reshape(heads, rows // heads // 2, 2).swapaxes(1, 2).reshape(-1)


def _split_fused(linears: dict[str, tuple[Any, Any]], dims: Dims) -> dict[str, tuple[Any, Any]]:
    """Phi-3's ``attn_qkv`` and double-height ``ffn_up`` as the separate projections the builder reads."""
    out = dict(linears)
    if "fused_qkv" in out:
        weight, bias = out.pop("fused_qkv")
        q, kv = dims.num_attn_heads * dims.head_size, dims.num_kv_heads * dims.head_size
        for name, part in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, None))):
            out[f"self_attn.{name}"] = (_rows(weight, part), None if bias is None else bias[part])
    if "mlp.up_proj" in out and _out_features(out["mlp.up_proj"][0]) == 2 * dims.intermediate_size:
        weight, bias = out.pop("mlp.up_proj")
        for name, part in (("gate_proj", slice(0, dims.intermediate_size)),
                           ("up_proj", slice(dims.intermediate_size, None))):
            out[f"mlp.{name}"] = (_rows(weight, part), None if bias is None else bias[part])
    return out


def _linear(tensor: Any, bits: int, report: Counter) -> QuantizedLinear | np.ndarray:
    type_name = tensor.tensor_type.name
    shape = (int(tensor.shape[1]), int(tensor.shape[0]))   # GGUF lists the fastest dimension (in_features) first
    if bits == 32:
        report[f"{type_name} float"] += 1
        return dequantized(tensor.data, type_name, shape)
    linear = quantized_linear(tensor.data, type_name, shape, bits)
    report[f"{type_name} {'exact' if linear.exact else f'int{linear.bits}'}"] += 1
    return linear


def _float(tensor: Any) -> np.ndarray:
    return dequantized(tensor.data, tensor.tensor_type.name, tuple(int(d) for d in reversed(tensor.shape)))


def _rows(weight: QuantizedLinear | np.ndarray, index: np.ndarray | slice) -> QuantizedLinear | np.ndarray:
    return weight.rows(index) if isinstance(weight, QuantizedLinear) else weight[index]


def _out_features(weight: QuantizedLinear | np.ndarray) -> int:
    return weight.out_features if isinstance(weight, QuantizedLinear) else weight.shape[0]


def _linear_module(weight: QuantizedLinear | np.ndarray, bias: np.ndarray | None) -> Any:
    import torch
    from onnxruntime_genai.models.loaders.gguf import GGUFTensorModule

    bias_tensor = None if bias is None else torch.from_numpy(np.ascontiguousarray(bias))
    if isinstance(weight, QuantizedLinear):
        return weight.module(bias_tensor)
    module = GGUFTensorModule()
    module.weight, module.bias = torch.from_numpy(np.ascontiguousarray(weight)), bias_tensor
    return module


def _set(layer: Any, path: str, kind: str, value: Any) -> None:
    owner = layer
    for part in path.split("."):
        owner = getattr(owner, part)
    setattr(owner, kind, value)


def _assign(layer: Any, path: str, module: Any) -> None:
    owner_path, name = path.rsplit(".", 1)
    setattr(getattr(layer, owner_path), name, module)
