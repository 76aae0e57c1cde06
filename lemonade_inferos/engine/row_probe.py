"""The attention probe of a prompt chunk, on its last rows only, beside a GroupQueryAttention that returns none.

A probe layer's GroupQueryAttention asked for its probabilities (``qk_output``) materializes them for the whole
chunk, ``[heads, chunk, context]`` fp32 two to three times over, and leaves ONNX Runtime's flash path (measured on
SmolLM2-135M's shapes, one node, 2 threads: 212 MiB and 36 ms for a 256-token chunk over 7,000 tokens, against 15
MiB and 23 ms without). The INT8 live form's float prefill path (``dual_attention.py``) has what the probabilities
are made of in hand: the rotated query and the present keys, in code units. So there the attention runs without
``qk_output``, and these nodes compute the probabilities of the chunk's last ``rows`` queries only (graph input
:data:`PROBE_ROWS`, one value per run): ``softmax(scale * q k^T + causal mask)`` per head, ``[1, heads, rows,
context]``, the rows GroupQueryAttention would return. The engine picks ``rows`` so that they stay within a few
MiB however long the context (``OrtEngine.probe_rows``); the ranking's normalization counts the rows that saw each
token, so fewer rows sample the same score.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

PROBE_ROWS = "inferos_probe_rows"


def row_probe_obstacle(node: onnx.NodeProto) -> str | None:
    """Why these nodes cannot stand in for this GroupQueryAttention's probabilities, or None."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("softcap", 0.0):
        return "softcap"
    if attributes.get("local_window_size", -1) != -1:
        return "a local window"
    if any(node.input[i] for i in (10, 11) if len(node.input) > i):
        return "an attention bias or head sink"
    return None


def add_row_probe(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], prefix: str, query: str, present_key: str,
                  total: str, shape: tuple[int, int, int], scale: float, activations: int, output: str) -> None:
    """Append to ``nodes`` the nodes writing ``output`` ``[1, heads, rows, total]``: the probabilities of the last
    ``rows`` of ``query`` (``[1, chunk, heads * head_size]``, rotated) over ``present_key`` (``[1, kv_heads, total,
    head_size]``); ``total`` is a 1-D int64 ``[total]``; ``shape`` is (heads, kv_heads, head_size). Constants go
    into ``graph`` (the main graph: a branch reads outer-scope values)."""
    heads, kv_heads, head_size = shape
    groups, p, make = heads // kv_heads, prefix, helper.make_node

    def const(name: str, values: list[int] | float, dtype: int = TensorProto.INT64) -> str:
        full = p + name
        scalar = not isinstance(values, list)
        graph.initializer.append(helper.make_tensor(full, dtype, [] if scalar else [len(values)],
                                                    [values] if scalar else values))
        return full

    nodes += [
        make("Shape", [query], [p + "chunk"], start=1, end=2),
        make("Sub", [p + "chunk", PROBE_ROWS], [p + "first"]),
        make("Slice", [query, p + "first", p + "chunk", const("axis1", [1])], [p + "q"]),
        # [1, rows, kv, groups, d] -> [1, kv, groups, rows, d] -> [1, kv, groups * rows, d]: head = kv * groups + g
        make("Reshape", [p + "q", const("q5_shape", [0, 0, kv_heads, groups, head_size])], [p + "q5"]),
        make("Transpose", [p + "q5"], [p + "q_heads"], perm=[0, 2, 3, 1, 4]),
        make("Reshape", [p + "q_heads", const("q4_shape", [0, kv_heads, -1, head_size])], [p + "q4"]),
        make("Transpose", [present_key], [p + "k_t"], perm=[0, 1, 3, 2]),
        make("MatMul", [p + "q4", p + "k_t"], [p + "qk"]),
        make("Mul", [p + "qk", const("scale", scale, activations)], [p + "scores"]),
        # causal: the row at position total - rows + i sees keys 0 .. total - rows + i
        make("Sub", [total, PROBE_ROWS], [p + "first_position"]),
        make("Squeeze", [p + "first_position"], [p + "first_position/scalar"]),
        make("Squeeze", [total], [p + "total/scalar"]),
        make("Range", [p + "first_position/scalar", p + "total/scalar", const("one", 1, TensorProto.INT64)],
             [p + "positions"]),
        make("Range", [const("zero", 0, TensorProto.INT64), p + "total/scalar", p + "one"], [p + "keys"]),
        make("Unsqueeze", [p + "positions", const("last_axis", [-1])], [p + "rows_column"]),
        make("Greater", [p + "keys", p + "rows_column"], [p + "future"]),
        make("Where", [p + "future", const("minus_inf", float("-inf"), activations),
                       const("no_bias", 0.0, activations)], [p + "bias"]),
        make("Tile", [p + "bias", const("groups_repeats", [groups, 1])], [p + "bias_groups"]),
        make("Add", [p + "scores", p + "bias_groups"], [p + "masked"]),
        make("Softmax", [p + "masked"], [p + "probabilities"], axis=-1),
        make("Reshape", [p + "probabilities", const("heads_shape", [0, heads, -1, 0])], [output]),
    ]
