"""onnxruntime-genai's model builder, given the config fields it reads and a GGUF's weights as they are.

``python -m lemonade_inferos.engine.og_builder ARGS`` runs ``python -m onnxruntime_genai.models.builder ARGS``
after two fix-ups:

- transformers 5 keeps Gemma 3's two RoPE bases as ``rope_parameters`` per layer type
  (``{"full_attention": {...}, "sliding_attention": {...}}``), where the builder (0.18) reads the flat
  ``rope_parameters["rope_type"]``, ``rope_theta`` and ``rope_local_base_freq`` of transformers 4. The config is
  given both shapes.
- With ``-i FILE.gguf`` (and ``-m`` a folder holding the config and tokenizer), the builder's GGUF loader, which
  takes unquantized files only, is replaced by gguf_weights.py's, which hands over the file's blocks; Q, K and V are
  packed into one MatMul only when their blocks agree; what each tensor type became is written to
  ``OUT/inferos_weights.json``. The builder's final quantization pass, which copies the whole graph into one
  protobuf, is skipped when it has no float matrix left to quantize.
- A file's RoPE frequency factors (``rope_freqs.weight``: Llama 3.1/3.2's "llama3" scaling, computed by llama.cpp's
  converter; transformers' GGUF reader drops them) divide the builder's RoPE frequencies as llama.cpp divides them,
  so the cos/sin tables are the ones llama-server rotates with.
- A zero point that is the operator's default everywhere (8 for 4 bits, 128 for 8: every exact grid's) is left
  out of ``MatMulNBits`` and ``GatherBlockQuantized``: ONNX Runtime's kernels then take their path without zero
  points, measured ~10% faster in 4-bit GEMV over weights beyond the cache (~3% of a Q4_0 1B's bytes saved too).
"""

from __future__ import annotations

import json
import runpy
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

EMBEDDING_TABLE = "model.embed_tokens.weight"   # the builder's name for a float embedding table
PRECISION_BITS = {"int4": 4, "int8": 8, "fp32": 32, "fp16": 32, "bf16": 32}
WEIGHTS_REPORT = "inferos_weights.json"


def with_flat_rope(config: Any) -> Any:
    """``config`` with a per-layer-type ``rope_parameters`` also readable the flat way (the global layers' base as
    ``rope_theta``, the sliding layers' as ``rope_local_base_freq``); other configs unchanged."""
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or "full_attention" not in rope:
        return config
    full = rope["full_attention"]
    rope.setdefault("rope_type", full.get("rope_type", "default"))
    rope.setdefault("rope_theta", full.get("rope_theta"))
    config.rope_theta = full.get("rope_theta")
    if "sliding_attention" in rope:
        config.rope_local_base_freq = rope["sliding_attention"].get("rope_theta")
    return config


def main() -> None:
    from transformers import AutoConfig

    load = AutoConfig.from_pretrained.__func__

    def from_pretrained(cls: type, *args: Any, **kwargs: Any) -> Any:
        return with_flat_rope(load(cls, *args, **kwargs))

    AutoConfig.from_pretrained = classmethod(from_pretrained)
    gguf, report = _option("-i"), Counter()
    if gguf is not None and gguf.endswith(".gguf"):
        _load_gguf_blocks(gguf, PRECISION_BITS[_option("-p") or "fp32"], report)
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
    if report:
        Path(_option("-o"), WEIGHTS_REPORT).write_text(json.dumps(dict(sorted(report.items())), indent=2))


def _option(flag: str) -> str | None:
    args = sys.argv[1:]
    return args[args.index(flag) + 1] if flag in args and args.index(flag) + 1 < len(args) else None


def _load_gguf_blocks(gguf: str, bits: int, report: Counter) -> None:
    """Route the builder's GGUF loading to gguf_weights.py, and keep Q/K/V apart when their layouts differ."""
    import importlib

    importlib.import_module("onnxruntime_genai.models")   # puts the builder's own folder on sys.path

    from lemonade_inferos.engine.gguf_weights import Dims, load_for_builder, qkv_layouts_agree

    embedding: dict[str, Any] = {}

    def from_pretrained(model_type: str, input_path: str, *sizes: int) -> Any:
        model = load_for_builder(input_path, bits, Dims(*sizes), report)
        embedding["blocks"] = model.embedding.blocks
        return model

    # the builder imports its modules as top-level ``loaders.gguf``, ``builders.base`` (its folder is on sys.path),
    # module objects apart from ``onnxruntime_genai.models.loaders.gguf``...: both get the patches
    factors = rope_frequency_factors(gguf)
    for prefix in ("", "onnxruntime_genai.models."):
        importlib.import_module(f"{prefix}loaders.gguf").GGUFModel.from_pretrained = staticmethod(from_pretrained)
        model_class = importlib.import_module(f"{prefix}builders.base").Model
        model_class.to_nbits = _unless_all_quantized(model_class.to_nbits, embedding)
        if factors is not None:   # where every architecture's cos/sin tables are made (make_rope_init is overridden)
            model_class.make_rotary_embedding_caches_from_scratch = _with_rope_factors(
                model_class.make_rotary_embedding_caches_from_scratch, factors)
    if not qkv_layouts_agree(gguf, bits):
        if "--extra_options" in sys.argv:
            sys.argv.insert(sys.argv.index("--extra_options") + 1, "fuse_qkv=false")
        else:
            sys.argv += ["--extra_options", "fuse_qkv=false"]


def rope_frequency_factors(gguf: str) -> np.ndarray | None:
    """The file's per-frequency RoPE divisors ``rope_freqs.weight`` (``[head_size / 2]``), or None."""
    from gguf import GGUFReader

    tensor = next((t for t in GGUFReader(gguf).tensors if t.name == "rope_freqs.weight"), None)
    return None if tensor is None else np.array(tensor.data, dtype=np.float32).reshape(-1)


def _with_rope_factors(make_caches: Any, factors: np.ndarray) -> Any:
    """The builder's cos/sin tables with the file's factors as its ``rescale_factors`` (inv_freq = 1 / (factor *
    theta ** (2i / d)): llama.cpp's ``freq_factors``), in place of any scaling it derived from the config."""
    def patched(self: Any) -> Any:
        import torch

        self.rope_attrs["rescale_factors"] = torch.from_numpy(factors.copy())
        self.rope_attrs.pop("rescale_inv_freq", None)
        return make_caches(self)
    return patched


def _unless_all_quantized(to_nbits: Any, embedding: dict[str, Any]) -> Any:
    """The builder's ``to_nbits`` after the embedding's float ``Gather`` became blocks, skipped when no MatMul or
    Gather multiplies by a float constant any more."""
    def guarded(self: Any) -> Any:
        if embedding.get("blocks") is not None and not isinstance(embedding["blocks"], np.ndarray):
            _embedding_as_blocks(self.model.graph, embedding["blocks"])
        if embedding:   # a GGUF's blocks: before to_nbits, whose own zero points are not the default
            drop_default_zero_points(self.model.graph)
        return to_nbits(self) if _float_weights_left(self.model) else self.model
    return guarded


def _embedding_as_blocks(graph: Any, blocks: Any) -> None:
    """The builder's float ``Gather`` over the embedding placeholder -> ``GatherBlockQuantized`` over the file's
    blocks (the layout the builder itself gives a tied embedding); nothing when the builder made no such Gather."""
    import onnx_ir as ir

    gather = next((n for n in graph if n.op_type == "Gather" and n.inputs[0] is not None
                   and n.inputs[0].name == EMBEDDING_TABLE), None)
    if gather is None:
        return
    layer, values = blocks.module(), {}   # the tensors a MatMulNBits over the same blocks takes
    for part, tensor in (("qweight", layer.qweight.reshape(layer.out_features, -1)), ("scales", layer.scales),
                         ("qzeros", layer.qzeros)):
        name = f"model.embed_tokens.{part}"
        values[part] = ir.Value(name=name, const_value=ir.tensor(tensor.numpy(), name=name))
        graph.register_initializer(values[part])
    node = ir.node("GatherBlockQuantized", [values["qweight"], gather.inputs[1], values["scales"], values["qzeros"]],
                   {"bits": blocks.bits, "block_size": blocks.block, "gather_axis": 0, "quantize_axis": 1},
                   domain="com.microsoft", name="/model/embed_tokens/GatherBlockQuantized")
    ir.convenience.replace_nodes_and_values(graph, gather, [gather], [node], [gather.outputs[0]], [node.outputs[0]])
    graph.initializers.pop(EMBEDDING_TABLE)


BLOCK_OPS = ("MatMulNBits", "GatherBlockQuantized")   # data, indices or input, scales, zero points
ZERO_POINT_INDEX = 3


def drop_default_zero_points(graph: Any) -> int:
    """Leave out every block-quantized node's zero points that all equal the operator's default (``2**(bits-1)``);
    an initializer no node reads any more is removed. Returns how many nodes lost theirs."""
    dropped = 0
    for node in list(graph):
        value = node.inputs[ZERO_POINT_INDEX] if node.op_type in BLOCK_OPS and len(node.inputs) > ZERO_POINT_INDEX \
            else None
        if value is None or value.const_value is None or not _all_default(node, value.const_value.numpy()):
            continue
        if len(node.inputs) == ZERO_POINT_INDEX + 1:
            node.resize_inputs(ZERO_POINT_INDEX)
        else:
            node.replace_input_with(ZERO_POINT_INDEX, None)
        dropped += 1
        if not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)
    return dropped


def _all_default(node: Any, zero_points: np.ndarray) -> bool:
    """Whether every block's zero point is the default (4-bit ones two to a byte, each row's last byte padded)."""
    from lemonade_inferos.engine.gguf_grid import unpack_codes

    bits = node.attributes["bits"].as_int() if "bits" in node.attributes else 4
    scales = node.inputs[2].const_value
    if bits not in (4, 8) or scales is None:
        return False
    rows = node.attributes["N"].as_int() if node.op_type == "MatMulNBits" else scales.shape[0]
    codes = unpack_codes(zero_points.reshape(rows, -1)[..., None], bits).reshape(rows, -1)
    return bool(np.all(codes[:, :scales.size // rows] == 1 << (bits - 1)))


def _float_weights_left(model: Any) -> bool:
    import onnx_ir as ir

    floats = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
    for node in model.graph:
        index = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        weight = node.inputs[index] if index is not None and len(node.inputs) > index else None
        if weight is not None and weight.const_value is not None and weight.const_value.dtype in floats:
            return True
    return False


if __name__ == "__main__":
    main()
