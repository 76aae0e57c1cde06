"""Load-time graph preparation: give GroupQueryAttention true positions.

GroupQueryAttention derives RoPE positions from the attention mask unless its
optional 10th input, ``position_ids``, is wired. After eviction the mask no
longer says where a token really is, so we add ``position_ids`` as a graph
input and feed it. With nothing evicted the positions are exactly those the
mask implies, so outputs stay bit-identical to the unpatched graph.

The patched graph is written beside the original (``model.inferos.onnx``,
sharing its external weights file) when the folder is writable; otherwise it
is loaded from memory.

Attention probe (optional): GroupQueryAttention can also return its softmax
probabilities (attribute ``qk_output=2``, a fourth output). For the layers in
``probe_layers`` that output becomes a graph output ``inferos_attention.N``, so
the KV cache can rank blocks by the attention they actually receive. It is a
separate graph (``model.inferos-probe.onnx``) because ONNX Runtime computes every
graph output, bound or not.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import onnx

log = logging.getLogger(__name__)

POSITION_IDS = "position_ids"
GQA_POSITION_IDS_INDEX = 9
PATCHED_SUFFIX = ".inferos.onnx"
PROBE_PREFIX = "inferos_attention."


@dataclass(frozen=True)
class PreparedGraph:
    """The model to hand to ``InferenceSession`` and what it can do."""

    model: str | bytes
    has_position_ids: bool
    num_gqa_nodes: int
    probe_outputs: tuple[str, ...] = ()


def _patch(model: onnx.ModelProto) -> tuple[bool, int]:
    """Wire ``position_ids`` into every rotary GroupQueryAttention node. Returns (patched, gqa count)."""
    graph = model.graph
    gqa_nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if any(i.name == POSITION_IDS for i in graph.input):
        return True, len(gqa_nodes)
    rotary = [n for n in gqa_nodes
              if any(a.name == "do_rotary" and onnx.helper.get_attribute_value(a) for a in n.attribute)]
    if not rotary:
        return False, len(gqa_nodes)
    graph.input.append(onnx.helper.make_tensor_value_info(
        POSITION_IDS, onnx.TensorProto.INT64, ["batch_size", "sequence_length"]))
    for node in rotary:
        while len(node.input) <= GQA_POSITION_IDS_INDEX:
            node.input.append("")
        node.input[GQA_POSITION_IDS_INDEX] = POSITION_IDS
    return True, len(gqa_nodes)


def _add_probes(model: onnx.ModelProto, probe_layers: tuple[int, ...]) -> tuple[str, ...]:
    """Expose the softmax probabilities of the GQA nodes at ``probe_layers`` (by order) as graph outputs."""
    gqa_nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    names = []
    for layer in probe_layers:
        node = gqa_nodes[layer]
        node.attribute.append(onnx.helper.make_attribute("qk_output", 2))
        while len(node.output) < 3:
            node.output.append("")
        name = f"{PROBE_PREFIX}{layer}"
        node.output.append(name)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        names.append(name)
    return tuple(names)


def prepare_graph(onnx_path: Path, probe_layers: tuple[int, ...] = ()) -> PreparedGraph:
    """Return the graph the engine should load, patched for true positions when possible."""
    suffix = PATCHED_SUFFIX if not probe_layers else f".inferos-probe{'-'.join(map(str, probe_layers))}.onnx"
    patched_path = onnx_path.with_name(onnx_path.stem + suffix)
    probe_names = tuple(f"{PROBE_PREFIX}{layer}" for layer in probe_layers)
    if patched_path.is_file() and patched_path.stat().st_mtime >= onnx_path.stat().st_mtime:
        model = onnx.load(str(patched_path), load_external_data=False)
        return PreparedGraph(str(patched_path), any(i.name == POSITION_IDS for i in model.graph.input),
                             sum(n.op_type == "GroupQueryAttention" for n in model.graph.node), probe_names)
    model = onnx.load(str(onnx_path), load_external_data=False)
    already = any(i.name == POSITION_IDS for i in model.graph.input)
    has_positions, num_gqa = _patch(model)
    if probe_layers:
        if not has_positions:
            raise ValueError(f"{onnx_path}: the attention probe needs rotary GroupQueryAttention nodes")
        _add_probes(model, probe_layers)
        already = False
    if already or not has_positions:
        if not has_positions:
            log.warning("%s has no rotary GroupQueryAttention: positions follow the mask, eviction is disabled",
                        onnx_path)
        return PreparedGraph(str(onnx_path), has_positions, num_gqa)
    if os.access(onnx_path.parent, os.W_OK):
        tmp_path = patched_path.with_suffix(".tmp")
        onnx.save(model, str(tmp_path))  # external data references stay relative to the same folder
        os.replace(tmp_path, patched_path)
        return PreparedGraph(str(patched_path), True, num_gqa, probe_names)
    onnx.load_external_data_for_model(model, str(onnx_path.parent))
    return PreparedGraph(model.SerializeToString(), True, num_gqa, probe_names)
