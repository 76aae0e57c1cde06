"""Two attention paths per layer in the INT8 live form's graph: the INT8 past read in place, and a float prefill.

ONNX Runtime's CPU GroupQueryAttention over a quantized past computes its scores element by element (measured on
SmolLM2-135M's shapes, 30 layers, 2 threads: 256 new tokens over a 2,048-token past in 806 ms against 216 ms over
a float past), while a decode step, memory-bound, is faster over INT8 (3.6 against 9.6 ms). So each
GroupQueryAttention of the INT8 graph becomes an ``If`` on the graph input :data:`INT8_ATTENTION`:

- **then** (decode, verification, scoring): the INT8 GroupQueryAttention as patched, its present the past's own
  buffer (written in place);
- **else** (a prefill chunk): the chunk's rotated K and its V are quantized as the INT8 path stores them, and a
  float GroupQueryAttention attends, in code units, over the past's valid rows cast from INT8 (one layer's rows at a
  time: the transient is a layer's past, freed before the next layer runs) and the chunk's codes: K's per-channel
  scales are folded into the query and V's into the output, so no pass over the past multiplies by a scale, and
  the scores are those of exactly the values the INT8 path stores. The chunk's K/V codes ``[batch, kv_heads,
  chunk, head_size]`` are the present outputs: the engine writes them into the cache after the run.

The weights stay outside the ``If`` (one copy, prepacked once); each ``If`` costs ~12 us a decode step (0.36 ms
for 30 layers at 2,048 tokens). A GroupQueryAttention node that cannot take the float path (no position ids to
rotate with, an unknown head size) leaves the graph as it was, with the reason.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from lemonade_inferos.engine.row_probe import PROBE_ROWS, add_row_probe, row_probe_obstacle

INT8_ATTENTION = "inferos_int8_attention"
ATTENTION_IF_PREFIX = "/inferos/attention/"   # each layer's If: ATTENTION_IF_PREFIX + layer
_DROPPED = ("do_rotary", "rotary_interleaved", "k_quant_type", "v_quant_type", "kv_cache_bit_width")
_POSITION_IDS, _ATTENTION_BIAS, _HEAD_SINK = 9, 10, 11


def dual_attention_obstacle(model: onnx.ModelProto, head_size: int | None = None) -> str | None:
    """Why the INT8 graph's attention cannot get a float prefill path, or None when it can (``head_size``: the
    model folder's, when the graph leaves it symbolic)."""
    graph = model.graph
    nodes = _gqa_nodes(graph)
    if not nodes:
        return "no GroupQueryAttention node"
    for node in nodes:
        if len(node.input) <= 13 or not node.input[12]:
            return f"{node.name} does not read an INT8 past with scale inputs"
        if _attribute(node, "do_rotary", 0) and (len(node.input) <= _POSITION_IDS or not node.input[_POSITION_IDS]):
            return f"{node.name} rotates without position ids"
        if (head_size or _head_size(graph, node)) is None:
            return f"{node.name}: the head size is not fixed in the graph"
        if _attribute(node, "local_window_size", -1) > 0:   # GQA refuses a past shorter than the window
            return f"{node.name} attends to a sliding window, which the float path's exact-length past cannot hold"
    return None


def add_dual_attention(model: onnx.ModelProto, head_size: int | None = None) -> None:
    """Wrap every GroupQueryAttention in an ``If`` (see the module docstring). The caller checked
    :func:`dual_attention_obstacle`."""
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info(INT8_ATTENTION, TensorProto.BOOL, []))
    present = set()
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    row_probes = 0
    for layer, node in enumerate(_gqa_nodes(graph)):
        position = list(graph.node).index(node)
        types = _output_types(graph, node)
        row_probe = probing(node) and opset >= 13 and row_probe_obstacle(node) is None
        row_probes += row_probe
        branches = (_int8_branch(node, layer, types),
                    _float_branch(graph, node, layer, head_size or _head_size(graph, node), types, row_probe))
        wrapped = helper.make_node("If", [INT8_ATTENTION], list(node.output), name=f"{ATTENTION_IF_PREFIX}{layer}",
                                   then_branch=branches[0], else_branch=branches[1])
        graph.node.remove(node)
        graph.node.insert(position, wrapped)
        present.update(node.output[1:3])
    if row_probes:
        graph.input.append(helper.make_tensor_value_info(PROBE_ROWS, TensorProto.INT64, [1]))
    for output in graph.output:  # a prefill's present holds the chunk's rows only
        if output.name in present and len(output.type.tensor_type.shape.dim) == 4:
            output.type.tensor_type.shape.dim[2].dim_param = "inferos_present_length"


def _output_types(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[int]:
    """Element types of the node's outputs: activations as the rotary caches are (float or float16), KV INT8."""
    cache = next((i for i in graph.initializer if i.name == node.input[7]), None) if len(node.input) > 7 else None
    activations = cache.data_type if cache is not None else TensorProto.FLOAT
    return [activations, TensorProto.INT8, TensorProto.INT8, activations]


def _int8_branch(node: onnx.NodeProto, layer: int, types: list[int]) -> onnx.GraphProto:
    prefix = f"/inferos/attention/{layer}/int8/"
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    inner.name = prefix + "GroupQueryAttention"
    del inner.output[:]
    inner.output.extend(prefix + f"output_{i}" if name else "" for i, name in enumerate(node.output))
    outputs = [helper.make_tensor_value_info(name, dtype, None) for name, dtype in zip(inner.output, types) if name]
    return helper.make_graph([inner], f"int8_attention_{layer}", [], outputs)


def probing(node: onnx.NodeProto) -> bool:
    """A GroupQueryAttention asked for its probabilities (the attention probe's)."""
    return (node.op_type == "GroupQueryAttention" and len(node.output) > 3 and bool(node.output[3])
            and bool(_attribute(node, "qk_output", 0)))


def _float_branch(graph: onnx.GraphProto, node: onnx.NodeProto, layer: int, head_size: int, types: list[int],
                  row_probe: bool = False) -> onnx.GraphProto:
    """The float prefill path of one layer; ``row_probe``: its probabilities (a probe layer's) come from
    ``row_probe.py`` on the chunk's last rows, and the attention itself returns none."""
    p = f"/inferos/attention/{layer}/float/"
    heads, kv_heads = _attribute(node, "num_heads", 0), _attribute(node, "kv_num_heads", 0)
    ins = list(node.input) + [""] * (14 - len(node.input))
    nodes: list[onnx.NodeProto] = []
    init = _Initializers(graph, heads, kv_heads, head_size, types[0])
    query, key, value = _rotated_qkv(graph, node, ins, init, p, nodes, head_size)
    codes = _in_code_units(ins, key, value, init, p, nodes, types[0])
    nodes.append(helper.make_node("Mul", [query, p + "k_scale_q"], [p + "query_units"]))
    attention_inputs = [p + "query_units", p + "k_units", p + "v_units", p + "k_past", p + "v_past", ins[5], ins[6],
                        "", "", "", ins[_ATTENTION_BIAS], ins[_HEAD_SINK]]
    while attention_inputs[-1] == "":
        attention_inputs.pop()
    dropped = _DROPPED + (("qk_output",) if row_probe else ())
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in dropped}
    outputs = [p + "output_units", p + "present_key", p + "present_value"] + \
        ([p + "output_3"] if len(node.output) > 3 and node.output[3] else [])
    nodes += [helper.make_node("GroupQueryAttention", attention_inputs, outputs[:3] if row_probe else outputs,
                               domain="com.microsoft", name=p + "GroupQueryAttention", do_rotary=0, **attributes),
              helper.make_node("Mul", [p + "output_units", p + "v_scale_q"], [p + "output_0"])]
    if row_probe:
        scale = _attribute(node, "scale", 0.0) or 1.0 / math.sqrt(head_size)
        add_row_probe(graph, nodes, p + "probe/", p + "query_units", p + "present_key", p + "total1",
                      (heads, kv_heads, head_size), scale, types[0], p + "output_3")
    for kind in ("k", "v"):  # [batch, chunk, kv_heads * head_size] -> [batch, kv_heads, chunk, head_size]
        nodes += [helper.make_node("Reshape", [codes[kind], init.heads_shape], [p + kind + "_codes4"]),
                  helper.make_node("Transpose", [p + kind + "_codes4"], [p + kind + "_new"], perm=[0, 2, 1, 3])]
    results = [p + "output_0", p + "k_new", p + "v_new", *outputs[3:]]
    return helper.make_graph(nodes, f"float_attention_{layer}", [],
                             [helper.make_tensor_value_info(name, dtype, None) for name, dtype in zip(results, types)])


def _rotated_qkv(graph: onnx.GraphProto, node: onnx.NodeProto, ins: list[str], init: _Initializers, p: str,
                 nodes: list[onnx.NodeProto], head_size: int) -> tuple[str, str, str]:
    """The chunk's query, key and value (split when packed), query and key rotated where the node rotates."""
    heads, kv_heads = _attribute(node, "num_heads", 0), _attribute(node, "kv_num_heads", 0)
    query, key, value = ins[0], ins[1], ins[2]
    if not key:  # packed QKV
        query, key, value = p + "q", p + "k", p + "v"
        nodes.append(helper.make_node("Split", [ins[0], init.split()], [query, key, value], axis=2))
    if _attribute(node, "do_rotary", 0):
        interleaved = _attribute(node, "rotary_interleaved", 0)
        for name, count in ((query, heads), (key, kv_heads)):
            nodes.append(helper.make_node("RotaryEmbedding", [name, ins[_POSITION_IDS], ins[7], ins[8]],
                                          [name + "/rotated"], domain="com.microsoft", interleaved=interleaved,
                                          num_heads=count, **_rotary_dim(graph, ins[7], head_size)))
        query, key = query + "/rotated", key + "/rotated"
    return query, key, value


def _in_code_units(ins: list[str], key: str, value: str, init: _Initializers, p: str,
                   nodes: list[onnx.NodeProto], dtype: int) -> dict[str, str]:
    """The chunk's K/V as the INT8 path stores them (the present outputs: the codes returned), and the past's
    valid rows, both in code units for the attention: K's scales are folded into the query and V's into the
    output (per channel, each query head taking its KV head's), so no pass over the past multiplies by a scale."""
    codes = {}
    for kind, name, scale in (("k", key, ins[12]), ("v", value, ins[13])):
        codes[kind] = p + kind + "_codes"
        # x / scale, then QuantizeLinear's rounding and saturation at a unit scale: ONNX Runtime's per-channel
        # QuantizeLinear runs element by element (measured 2.3 ms a call against 0.1 ms for this pair)
        nodes += [helper.make_node("Div", [name, scale], [p + kind + "_scaled"]),
                  helper.make_node("QuantizeLinear", [p + kind + "_scaled", init.unit_scale, init.zero_point],
                                   [codes[kind]]),
                  helper.make_node("Cast", [codes[kind]], [p + kind + "_units"], to=dtype)]
    nodes += [helper.make_node("Shape", [ins[0]], [p + "chunk"], start=1, end=2),
              helper.make_node("Cast", [ins[6]], [p + "total64"], to=TensorProto.INT64),
              helper.make_node("Reshape", [p + "total64", init.one_dim], [p + "total1"]),
              helper.make_node("Sub", [p + "total1", p + "chunk"], [p + "past_length"])]
    for kind, past, scale in (("k", ins[3], ins[12]), ("v", ins[4], ins[13])):
        nodes += [helper.make_node("Slice", [past, init.zero, p + "past_length", init.axis2], [p + kind + "_past8"]),
                  helper.make_node("Cast", [p + kind + "_past8"], [p + kind + "_past"], to=dtype),
                  helper.make_node("Reshape", [scale, init.kv_groups], [p + kind + "_scale3"]),
                  helper.make_node("Expand", [p + kind + "_scale3", init.head_groups], [p + kind + "_scale_heads"]),
                  helper.make_node("Reshape", [p + kind + "_scale_heads", init.flat], [p + kind + "_scale_q"])]
    return codes


class _Initializers:
    """Constants the float branches share, added to the main graph once (subgraphs read outer-scope values)."""

    def __init__(self, graph: onnx.GraphProto, heads: int, kv_heads: int, head_size: int, activations: int) -> None:
        self._graph, self._sizes = graph, (heads, kv_heads, head_size)
        tag = f"{heads}x{kv_heads}x{head_size}"
        self.zero_point = self._add(graph, "/inferos/attention/zero_point", TensorProto.INT8, [], 0)
        self.unit_scale = self._add(graph, f"/inferos/attention/unit_scale_{activations}", activations, [], 1.0)
        self.kv_groups = self._add(graph, f"/inferos/attention/kv_groups_{tag}", TensorProto.INT64,
                                   [kv_heads, 1, head_size])
        self.head_groups = self._add(graph, f"/inferos/attention/head_groups_{tag}", TensorProto.INT64,
                                     [kv_heads, heads // kv_heads, head_size])
        self.heads_shape = self._add(graph, f"/inferos/attention/heads_shape_{tag}", TensorProto.INT64,
                                     [0, 0, kv_heads, head_size])
        self.zero = self._add(graph, "/inferos/attention/zero", TensorProto.INT64, [0])
        self.axis2 = self._add(graph, "/inferos/attention/axis2", TensorProto.INT64, [2])
        self.one_dim = self._add(graph, "/inferos/attention/one_dim", TensorProto.INT64, [1])
        self.flat = self._add(graph, "/inferos/attention/flat", TensorProto.INT64, [-1])

    def split(self) -> str:
        """The packed QKV's split sizes (added only for a graph that packs them: an unused one draws a warning)."""
        heads, kv_heads, head_size = self._sizes
        return self._add(self._graph, f"/inferos/attention/split_{heads}x{kv_heads}x{head_size}", TensorProto.INT64,
                         [heads * head_size, kv_heads * head_size, kv_heads * head_size])

    @staticmethod
    def _add(graph: onnx.GraphProto, name: str, dtype: int, values: list[int], scalar: float | None = None) -> str:
        """A 1-D constant of ``values``, or a scalar when ``scalar`` is given."""
        if not any(i.name == name for i in graph.initializer):
            tensor = (helper.make_tensor(name, dtype, [], [scalar]) if scalar is not None
                      else helper.make_tensor(name, dtype, [len(values)], values))
            graph.initializer.append(tensor)
        return name


def _gqa_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "GroupQueryAttention"]


def _attribute(node: onnx.NodeProto, name: str, default):
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _head_size(graph: onnx.GraphProto, node: onnx.NodeProto) -> int | None:
    past = next((i for i in graph.input if i.name == node.input[3]), None)
    dims = past.type.tensor_type.shape.dim if past is not None else []
    return dims[3].dim_value or None if len(dims) == 4 else None


def _rotary_dim(graph: onnx.GraphProto, cos_cache: str, head_size: int) -> dict[str, int]:
    """``rotary_embedding_dim`` when the cos cache rotates part of each head only (else the op's default)."""
    cache = next((i for i in graph.initializer if i.name == cos_cache), None)
    if cache is None or len(cache.dims) != 2 or 2 * cache.dims[1] == head_size:
        return {}
    return {"rotary_embedding_dim": int(2 * cache.dims[1])}
