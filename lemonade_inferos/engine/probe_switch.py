"""The attention probe as a switch: a run asks for the probe layers' probabilities, or runs them without.

ONNX Runtime's CPU GroupQueryAttention (1.32) attends with a tiled online softmax (flash attention) unless it is
asked for its probabilities (``qk_output``); then it materializes them, ``[heads, chunk, context]`` fp32, more
than once. Measured on SmolLM2-135M's shapes, one node, a 256-token chunk over a 7,000-token past, 2 threads: 15
MiB and 23 ms without them, 212 MiB and 36 ms with them. So every probing GroupQueryAttention left after
``row_probe.py`` (the float live form's probe graph) becomes an ``If`` on the graph input :data:`PROBE_SWITCH`:

- **then**: the node as it was, probabilities included;
- **else**: the node without ``qk_output``; its probability output is an empty ``[1, 1, 1, 0]`` tensor (an
  ``If``'s branches agree on types, not shapes), so the probe output of such a run is empty.

Graphs whose probe cannot be computed beside the attention (``row_probe.py``: the INT8 live form's float prefill
path can) get this switch: the engine probes decode steps, verifications and short chunks, and runs a long prompt
chunk unprobed but for its last rows, which run on their own (``OrtEngine.probe_rows``); the ranking's
normalization (each token's attention averaged over the rows that saw it) allows for the rows it is given.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from lemonade_inferos.engine.dual_attention import ATTENTION_IF_PREFIX, probing

PROBE_SWITCH = "inferos_probe"
SWITCH_PREFIX = "/inferos/probe_switch/"
_QK_OUTPUT = "qk_output"


def add_probe_switch(model: onnx.ModelProto) -> int:
    """Wrap every probing GroupQueryAttention (top level, or in a dual-attention ``If``'s float branch) in an
    ``If`` on :data:`PROBE_SWITCH`, adding that input. Returns how many were wrapped."""
    graph = model.graph
    owners = [graph] + [_branch(node, "else_branch") for node in graph.node
                        if node.op_type == "If" and node.name.startswith(ATTENTION_IF_PREFIX)]
    wrapped = 0
    for owner in owners:
        for node in [n for n in owner.node if probing(n)]:
            _wrap(graph, owner, node, wrapped)
            wrapped += 1
    if wrapped and not any(i.name == PROBE_SWITCH for i in graph.input):
        graph.input.append(helper.make_tensor_value_info(PROBE_SWITCH, TensorProto.BOOL, []))
    return wrapped


def _branch(node: onnx.NodeProto, name: str) -> onnx.GraphProto:
    return next(a for a in node.attribute if a.name == name).g


def _wrap(graph: onnx.GraphProto, owner: onnx.GraphProto, node: onnx.NodeProto, index: int) -> None:
    prefix = f"{SWITCH_PREFIX}{index}/"
    types = _output_types(graph, node)
    probed, plain = _copy(node, prefix + "on/"), _copy(node, prefix + "off/")
    plain.attribute.remove(next(a for a in plain.attribute if a.name == _QK_OUTPUT))
    empty = plain.output[3]
    del plain.output[3:]
    nothing = helper.make_node("Constant", [], [empty], name=prefix + "off/Constant",
                               value=helper.make_tensor(empty + "/value", types[3], [1, 1, 1, 0], []))
    then_branch = helper.make_graph([probed], f"probed_attention_{index}", [], _infos(probed.output, types))
    else_branch = helper.make_graph([plain, nothing], f"attention_{index}", [],
                                    _infos([*plain.output, empty], types))
    switch = helper.make_node("If", [PROBE_SWITCH], [name for name in node.output if name], name=prefix + "If",
                              then_branch=then_branch, else_branch=else_branch)
    position = list(owner.node).index(node)
    owner.node.remove(node)
    owner.node.insert(position, switch)


def _copy(node: onnx.NodeProto, prefix: str) -> onnx.NodeProto:
    """The node under new output names (an unused optional output stays unnamed, in its place)."""
    inner = onnx.NodeProto()
    inner.CopyFrom(node)
    inner.name = prefix + "GroupQueryAttention"
    del inner.output[:]
    inner.output.extend(prefix + f"output_{i}" if name else "" for i, name in enumerate(node.output))
    return inner


def _infos(names, types: list[int]) -> list[onnx.ValueInfoProto]:
    """Value infos of the named outputs, each with the type of its position."""
    return [helper.make_tensor_value_info(name, dtype, None) for name, dtype in zip(names, types) if name]


def _output_types(graph: onnx.GraphProto, node: onnx.NodeProto) -> list[int]:
    """Element types of the node's four outputs: activations as its rotary cache is (else float), the present
    as the graph's past input is (else the activations': a past computed inside a branch)."""
    initializers = {i.name: i.data_type for i in graph.initializer}
    activations = initializers.get(node.input[7], TensorProto.FLOAT) if len(node.input) > 7 else TensorProto.FLOAT
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    past = inputs.get(node.input[3], activations) if len(node.input) > 3 else activations
    return [activations, past, past, activations]
