"""Fused attention: each ``softmax(a b^T * scale) c`` of the traced encoder becomes one MultiHeadAttention node.

The graph torch exports spells attention out: MatMul, Mul, Softmax, MatMul
over (batch, heads, tokens, head_dim) tensors, writing the (tokens x tokens)
weights of every head to memory and reading them back. ONNX Runtime's
``com.microsoft.MultiHeadAttention`` does the same arithmetic in one kernel
(CPU and CUDA; flash attention on GPUs). MRAD's dual path has two such
products per block, the ordinary q-k one and the v-v one (spec section 2):
both are rewritten. The head split stays in the graph; only the product
changes, so every other node, and every output, is as traced.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MS_DOMAIN = "com.microsoft"
TO_TOKENS_FIRST = [0, 2, 1, 3]  # (batch, heads, tokens, dim) <-> (batch, tokens, heads, dim)


def fuse_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Rewrite ``model`` in place; return how many attention products were fused."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    graph_outputs = {o.name for o in graph.output}

    def only_use(name: str) -> onnx.NodeProto | None:
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in graph_outputs else None

    flat = _constant(graph, "fused_attention/to_tokens_by_features", [0, 0, -1])
    split = _constant(graph, "fused_attention/to_heads", [0, 0, num_heads, -1])
    in_place_of: dict[str, list[onnx.NodeProto]] = {}  # a product's output -> the nodes that replace its four
    replaced: set[str] = set()  # outputs of the nodes replaced
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        match = _match(softmax, producer, only_use, constants)
        if match is None:
            continue
        (query, key, value), scale, nodes_replaced = match
        prefix = f"fused_attention_{len(in_place_of)}"
        nodes, tokens_first = [], {}
        for name in dict.fromkeys((query, key, value)):  # MRAD's v-v product: one conversion serves all three
            tokens_first[name] = f"{prefix}/{len(tokens_first)}_bsh"
            nodes += [helper.make_node("Transpose", [name], [f"{tokens_first[name]}_t"], perm=TO_TOKENS_FIRST),
                      helper.make_node("Reshape", [f"{tokens_first[name]}_t", flat], [tokens_first[name]])]
        output = nodes_replaced[-1].output[0]
        nodes += [
            helper.make_node("MultiHeadAttention", [tokens_first[query], tokens_first[key], tokens_first[value]],
                             [f"{prefix}/out"], domain=MS_DOMAIN, num_heads=num_heads, scale=scale),
            helper.make_node("Reshape", [f"{prefix}/out", split], [f"{prefix}/out_heads"]),
            helper.make_node("Transpose", [f"{prefix}/out_heads"], [output], perm=TO_TOKENS_FIRST),
        ]
        in_place_of[output] = nodes
        replaced.update(n.output[0] for n in nodes_replaced)
    rewritten = []
    for node in graph.node:  # the graph's order, each product's place taken by its replacement
        if node.output[0] in in_place_of:
            rewritten += in_place_of[node.output[0]]
        elif node.output[0] not in replaced:
            rewritten.append(_copy(node))
    _set_nodes(graph, rewritten)
    _drop_unused(graph)
    if in_place_of and not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return len(in_place_of)


def _match(softmax, producer, only_use, constants):
    """(query, key, value), scale and the nodes replaced, when ``softmax`` sits in softmax(q k^T * s) v."""
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    scaled = producer.get(softmax.input[0])
    product = only_use(softmax.output[0])
    if axis not in (-1, 3) or scaled is None or scaled.op_type != "Mul" or product is None:
        return None
    if product.op_type != "MatMul" or product.input[0] != softmax.output[0]:
        return None
    scores_name = next((i for i in scaled.input if i not in constants), None)
    scale_name = next((i for i in scaled.input if i in constants), None)
    scores = producer.get(scores_name)
    if scale_name is None or constants[scale_name].size != 1 or scores is None or scores.op_type != "MatMul":
        return None
    if only_use(scores.output[0]) is not scaled or only_use(scaled.output[0]) is not softmax:
        return None
    transposed = producer.get(scores.input[1])
    perm = next((list(a.ints) for a in transposed.attribute if a.name == "perm"), None) if transposed else None
    if transposed is None or transposed.op_type != "Transpose" or perm != [0, 1, 3, 2]:
        return None
    return ((scores.input[0], transposed.input[0], product.input[1]), float(constants[scale_name].reshape(())),
            [scores, scaled, softmax, product])


def _constant(graph: onnx.GraphProto, name: str, values: list[int]) -> str:
    graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    copied = onnx.NodeProto()
    copied.CopyFrom(node)  # a detached copy: the graph's own list is about to be cleared
    return copied


def _set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (the transposes of k that fed the old products)."""
    dropped = True
    while dropped:  # a node dropped may leave its own inputs unread
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        unread = [i for i, node in enumerate(graph.node) if not any(out in used for out in node.output)]
        for index in reversed(unread):
            del graph.node[index]
        dropped = bool(unread)
    used = {name for node in graph.node for name in node.input}
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in used:
            del graph.initializer[index]
