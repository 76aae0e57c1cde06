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
``probe_layers`` their mean over the query heads becomes a graph output
``inferos_attention_mean.N`` (``[1, 1, S, T]``), so the KV cache can rank blocks
by the attention they actually receive. The mean is taken in the graph: the
per-head probabilities of a 256-token chunk over a 6.9K-token context are
64 MiB per probe layer, held until the run returns, and ranking needs only the
mean (the score divides by the rows it averaged over). It is a
separate graph (``model.inferos-probe.onnx``) because ONNX Runtime computes every
graph output, bound or not.

Logits positions: the LM head (576 x 49152 for SmolLM2) is a fifth of a
prefill's multiply-adds when it runs on every prompt token, yet generation needs
the last token's logits only. A ``Gather`` on the sequence axis in front of the
LM head, fed by the input ``inferos_logits_positions``, lets the engine ask for
just the rows it uses (all of them when scoring).

INT8 live KV (optional): GroupQueryAttention reads and writes a quantized past
itself (``k_quant_type``/``v_quant_type`` PER_CHANNEL, ``kv_cache_bit_width`` 8,
int8 past/present, float ``k_scale``/``v_scale`` inputs 12 and 13). The patch
turns every GroupQueryAttention of a float-KV graph into that form with the
scales as graph inputs ``inferos_kv_scale.N.key``/``.value`` the engine binds, so
the working buffer the model reads is a quarter of fp32's bytes. A graph that
cannot be patched (no GroupQueryAttention, a past not fed straight into one, a
KV dtype that is not float) keeps its form and the reason is reported.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper

from lemonade_inferos.engine.dual_attention import (ATTENTION_IF_PREFIX, INT8_ATTENTION, add_dual_attention,
                                                     dual_attention_obstacle)
from lemonade_inferos.engine.probe_switch import PROBE_SWITCH, add_probe_switch
from lemonade_inferos.engine.row_probe import PROBE_ROWS

log = logging.getLogger(__name__)

POSITION_IDS = "position_ids"
GQA_POSITION_IDS_INDEX = 9
PROBE_PREFIX = "inferos_attention_mean."   # a new name: graphs cached with per-head probes are rebuilt
LOGITS_POSITIONS = "inferos_logits_positions"
LM_HEAD_OPS = ("MatMul", "MatMulNBits", "Gemm")
KV_SCALE_PREFIX = "inferos_kv_scale."
GQA_K_SCALE_INDEX, GQA_V_SCALE_INDEX = 12, 13
FLOAT_KV_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class PreparedGraph:
    """The model to hand to ``InferenceSession`` and what it can do."""

    model: str | bytes
    has_position_ids: bool
    num_gqa_nodes: int
    probe_outputs: tuple[str, ...] = ()
    has_logits_positions: bool = False
    kv_scale_inputs: tuple[tuple[str, str], ...] = ()   # per layer (key, value) scale inputs of the INT8 live form
    kv_int8_reason: str | None = None                    # why the INT8 live form was not made (when asked)
    kv_elem_type: int = onnx.TensorProto.FLOAT           # the past's element type (ONNX TensorProto enum)
    dual_attention: bool = False                         # an INT8 graph with a float prefill path (dual_attention.py)
    probe_switch: bool = False                           # a run may leave the probes out (probe_switch.py)
    row_probe: bool = False                              # a prompt chunk is probed on its last rows (row_probe.py)


def kv_scale_names(layer: int) -> tuple[str, str]:
    return f"{KV_SCALE_PREFIX}{layer}.key", f"{KV_SCALE_PREFIX}{layer}.value"


def int8_kv_obstacle(model: onnx.ModelProto) -> str | None:
    """Why this graph's GroupQueryAttention nodes cannot take an INT8 past, or None when they can."""
    graph = model.graph
    gqa_nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    if not gqa_nodes:
        return "the graph has no GroupQueryAttention node"
    inputs = {i.name: i for i in graph.input}
    outputs = {o.name for o in graph.output}
    for node in gqa_nodes:
        if any(a.name in ("k_quant_type", "v_quant_type") for a in node.attribute):
            return f"{node.name} already reads a quantized past"
        if len(node.input) < 5 or node.input[3] not in inputs or node.input[4] not in inputs:
            return f"{node.name}: its past key/value are not graph inputs"
        if len(node.output) < 3 or node.output[1] not in outputs or node.output[2] not in outputs:
            return f"{node.name}: its present key/value are not graph outputs"
        if inputs[node.input[3]].type.tensor_type.elem_type not in FLOAT_KV_TYPES:
            return f"{node.name}: past KV dtype is not float"
        used_elsewhere = [n.name for n in graph.node if n is not node and
                          (node.input[3] in n.input or node.input[4] in n.input)]
        if used_elsewhere:
            return f"{node.name}: its past is also read by {used_elsewhere[0]}"
    return None


def _quantize_kv(model: onnx.ModelProto) -> None:
    """Make every GroupQueryAttention read and write an INT8 past with per-channel scale inputs (by node order,
    which is layer order). The caller checked :func:`int8_kv_obstacle`."""
    graph = model.graph
    gqa_nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    kv_names = set()
    for layer, node in enumerate(gqa_nodes):
        key_scale, value_scale = kv_scale_names(layer)
        channels = _channels(graph, node.input[3])
        while len(node.input) <= GQA_V_SCALE_INDEX:
            node.input.append("")
        node.input[GQA_K_SCALE_INDEX], node.input[GQA_V_SCALE_INDEX] = key_scale, value_scale
        node.attribute.extend([onnx.helper.make_attribute("k_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("v_quant_type", "PER_CHANNEL"),
                               onnx.helper.make_attribute("kv_cache_bit_width", 8)])
        for name in (key_scale, value_scale):
            graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [channels]))
        kv_names.update([node.input[3], node.input[4], node.output[1], node.output[2]])
    for value_info in (*graph.input, *graph.output):
        if value_info.name in kv_names:
            value_info.type.tensor_type.elem_type = onnx.TensorProto.INT8


def _channels(graph: onnx.GraphProto, past_name: str) -> int | str:
    """kv_heads * head_size of a past input ``[batch, kv_heads, past, head_size]`` (symbolic when not fixed)."""
    dims = next(i for i in graph.input if i.name == past_name).type.tensor_type.shape.dim
    if len(dims) == 4 and dims[1].dim_value and dims[3].dim_value:
        return dims[1].dim_value * dims[3].dim_value
    return "kv_channels"


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
    """Expose the softmax probabilities of the GQA nodes at ``probe_layers`` (by order), averaged over the query
    heads, as graph outputs ``[1, 1, S, T]``."""
    gqa_nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    names = []
    for layer in probe_layers:
        node = gqa_nodes[layer]
        node.attribute.append(onnx.helper.make_attribute("qk_output", 2))
        while len(node.output) < 3:
            node.output.append("")
        per_head, name = f"/inferos/attention_probs/{layer}", f"{PROBE_PREFIX}{layer}"
        node.output.append(per_head)
        mean = _mean_over_heads(model, per_head, name, layer)
        model.graph.node.insert(list(model.graph.node).index(node) + 1, mean)
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        names.append(name)
    return tuple(names)


def _mean_over_heads(model: onnx.ModelProto, per_head: str, name: str, layer: int) -> onnx.NodeProto:
    """``ReduceMean`` over axis 1, in the form the graph's opset takes (axes an input from opset 18)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    node_name = f"/inferos/attention_mean/{layer}"
    if opset < 18:
        return onnx.helper.make_node("ReduceMean", [per_head], [name], axes=[1], keepdims=1, name=node_name)
    axes = f"/inferos/attention_probs/{layer}/axes"
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
    return onnx.helper.make_node("ReduceMean", [per_head, axes], [name], keepdims=1, name=node_name)


def _select_logits_rows(model: onnx.ModelProto) -> bool:
    """Gather the LM head's input rows at ``inferos_logits_positions``. False when the LM head is not found."""
    graph = model.graph
    if any(i.name == LOGITS_POSITIONS for i in graph.input):
        return True
    producers = {out: node for node in graph.node for out in node.output}
    head = producers.get("logits")
    while head is not None and head.op_type == "Cast":  # fp16 models cast the LM head's output to fp32
        head = producers.get(head.input[0])
    if head is None or head.op_type not in LM_HEAD_OPS:
        return False
    hidden, rows = head.input[0], "inferos_logits_rows"
    graph.input.append(onnx.helper.make_tensor_value_info(LOGITS_POSITIONS, onnx.TensorProto.INT64,
                                                          ["logits_positions"]))
    gather = onnx.helper.make_node("Gather", [hidden, LOGITS_POSITIONS], [rows], name="/inferos/logits_rows",
                                   axis=1)
    graph.node.insert(list(graph.node).index(head), gather)
    head.input[0] = rows
    for output in graph.output:
        if output.name == "logits" and len(output.type.tensor_type.shape.dim) == 3:
            output.type.tensor_type.shape.dim[1].dim_param = "logits_positions"
    return True


def _describe(model: onnx.ModelProto, model_ref: str | bytes, probe_names: tuple[str, ...],
              kv_int8_reason: str | None = None) -> PreparedGraph:
    inputs = {i.name for i in model.graph.input}
    gqa = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node) + \
        sum(n.op_type == "If" and n.name.startswith(ATTENTION_IF_PREFIX) for n in model.graph.node)
    # counted by the inputs themselves: a probe switch's If hides its layer's GroupQueryAttention from ``gqa``
    scale_layers = sum(name.startswith(KV_SCALE_PREFIX) and name.endswith(".key") for name in inputs)
    scales = tuple(kv_scale_names(layer) for layer in range(scale_layers))
    past = next((i for i in model.graph.input if i.name.startswith("past_key_values")), None)
    elem = past.type.tensor_type.elem_type if past is not None else onnx.TensorProto.FLOAT
    return PreparedGraph(model_ref, POSITION_IDS in inputs, gqa, probe_names, LOGITS_POSITIONS in inputs, scales,
                         kv_int8_reason, elem, INT8_ATTENTION in inputs, PROBE_SWITCH in inputs, PROBE_ROWS in inputs)


def default_probe_layers(num_layers: int, local_layers: tuple[int, ...] = ()) -> tuple[int, ...]:
    """Two probe layers, an eighth and half-way into the stack (3 and 15 of 30: measured as good as six), or the
    global layers nearest them where others attend to a sliding window (``local_layers``): GroupQueryAttention
    returns no probabilities over a window, and a global layer's rank every cached token (Gemma 3: 5 and 11)."""
    local = set(local_layers)
    candidates = [layer for layer in range(num_layers) if layer not in local] or list(range(num_layers))
    return tuple(sorted({min(candidates, key=lambda layer: abs(layer - target))
                         for target in (num_layers // 8, num_layers // 2)}))


def prepare_graph(onnx_path: Path, probe_layers: tuple[int, ...] = (), int8_kv: bool = False,
                  head_size: int | None = None) -> PreparedGraph:
    """Return the graph the engine should load, patched for true positions when possible (and for the INT8 live
    KV form when ``int8_kv``: see :attr:`PreparedGraph.kv_int8_reason` when it could not be; ``head_size``, the
    folder's, lets its float prefill path be built where the graph leaves the head size symbolic)."""
    suffix = "" if not probe_layers else f"-probe{'-'.join(map(str, probe_layers))}"
    patched_path = onnx_path.with_name(onnx_path.stem + ".inferos" + suffix + ("-kv8" if int8_kv else "") + ".onnx")
    probe_names = tuple(f"{PROBE_PREFIX}{layer}" for layer in probe_layers)
    if patched_path.is_file() and patched_path.stat().st_mtime >= onnx_path.stat().st_mtime:
        model = onnx.load(str(patched_path), load_external_data=False)
        inputs = {i.name for i in model.graph.input}
        outputs = {o.name for o in model.graph.output}
        dual = not int8_kv or INT8_ATTENTION in inputs or dual_attention_obstacle(model, head_size) is not None
        if LOGITS_POSITIONS in inputs and dual \
                and (not probe_layers or inputs & {PROBE_SWITCH, PROBE_ROWS}) and outputs.issuperset(probe_names):
            # else: an older version's
            return _describe(model, str(patched_path), probe_names)
    model = onnx.load(str(onnx_path), load_external_data=False)
    original_inputs = {i.name for i in model.graph.input}
    kv_int8_reason = int8_kv_obstacle(model) if int8_kv else None
    if int8_kv and kv_int8_reason is None:
        _quantize_kv(model)
    elif int8_kv:
        log.warning("%s: INT8 live KV not possible (%s); the KV cache stays in the model's dtype",
                    onnx_path, kv_int8_reason)
        return replace(prepare_graph(onnx_path, probe_layers), kv_int8_reason=kv_int8_reason)
    has_positions, _ = _patch(model)
    if not has_positions:
        log.warning("%s has no rotary GroupQueryAttention: positions follow the mask, eviction is disabled",
                    onnx_path)
    if probe_layers:
        if not has_positions:
            raise ValueError(f"{onnx_path}: the attention probe needs rotary GroupQueryAttention nodes")
        _add_probes(model, probe_layers)
    if int8_kv:  # after the probes: both attention paths output the probed layers' scores
        obstacle = dual_attention_obstacle(model, head_size)
        if obstacle is None:
            add_dual_attention(model, head_size)
        else:
            log.info("%s: prefill reads the INT8 past in place (%s)", onnx_path, obstacle)
    if probe_layers:  # last: the float prefill path's probing attention too
        add_probe_switch(model)
    if not _select_logits_rows(model):
        log.info("%s: LM head not found; every prompt position's logits are computed", onnx_path)
    if {i.name for i in model.graph.input} == original_inputs and not probe_layers:
        return _describe(model, str(onnx_path), probe_names)
    home = _graph_home(onnx_path)
    if home is not None and os.access(home, os.W_OK):
        written = home / patched_path.name
        tmp_path = written.with_suffix(".tmp")
        onnx.save(model, str(tmp_path))  # external data references stay relative to the same folder
        os.replace(tmp_path, written)
        if written != patched_path:  # a folder of symlinks: the patched graph sits by the data it reads
            patched_path.unlink(missing_ok=True)
            patched_path.symlink_to(written)
        return _describe(model, str(patched_path), probe_names)
    onnx.load_external_data_for_model(model, str(onnx_path.parent))
    return _describe(model, model.SerializeToString(), probe_names)


def _graph_home(onnx_path: Path) -> Path | None:
    """Where a patched graph must lie for ONNX Runtime to read the external data it names: the model's folder,
    or, when that folder's data files are symlinks (a copy made of links), the folder they point into (ONNX
    Runtime refuses data that escapes the graph's real directory). None when neither works (links to files of
    other names, as in a Hugging Face cache): the graph is then loaded from memory."""
    folder = onnx_path.parent
    data = sorted(folder.glob(onnx_path.name + ".data*"))
    if not any(d.is_symlink() for d in data):
        return folder
    real = onnx_path.resolve().parent
    if all((real / d.name).resolve() == d.resolve() for d in data):
        return real
    return None
