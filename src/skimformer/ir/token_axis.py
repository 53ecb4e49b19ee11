"""Follow one axis (the token axis) through an ATen graph, op by op, with symbolic sizes.

This is the mechanism every shape-changing pass stands on. An `Axis` names a dimension of a
node's value and, when a reshape folded it together with neighbours (GPT-2's Conv1D flattens
`[B, N, C]` to `[B*N, C]`), where the token factor sits inside that dimension. Each op has one
rule that maps a dimension of an input to a dimension of the output (like sharding propagation
tracks a sharded axis); reshapes are mapped by element strides, so nothing is matched by value:
a token count equal to the head dim or the batch cannot confuse it.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace
from math import prod
from typing import Callable

import sympy
import torch
import torch.fx as fx

from skimformer.ir.graph import op_name, value
from skimformer.ir.sizes import divides, same_size, to_expr

# Ops whose output is the broadcast of their tensor inputs, element by element.
ELEMENTWISE = frozenset("""
add sub mul div true_divide floor_divide remainder pow neg abs exp expm1 log log1p sqrt rsqrt reciprocal
sin cos tanh sigmoid silu gelu relu relu6 leaky_relu hardtanh hardswish hardsigmoid mish erf elu softplus
where masked_fill eq ne lt le gt ge logical_and logical_or logical_not logical_xor bitwise_and bitwise_or
bitwise_not bitwise_xor __and__ __or__ __xor__ __invert__ minimum maximum clamp clamp_min clamp_max
to _to_copy type_as clone contiguous dropout detach alias lift_fresh_copy copy fill masked_scatter
softmax _softmax log_softmax _log_softmax layer_norm native_layer_norm rms_norm
cumsum _assert_tensor_metadata triu tril sign floor ceil round nan_to_num isinf isnan
""".split())
RESHAPES = frozenset("view reshape _unsafe_view flatten unflatten view_as reshape_as".split())
# Ops that keep every dimension but may change the size of one (the token count changes through them).
SAME_DIMS = frozenset("slice cat split split_with_sizes chunk narrow index_select repeat_interleave".split())
REDUCTIONS = frozenset("mean sum amax amin max min var std prod logsumexp any all argmax argmin".split())


@dataclass(frozen=True)
class Axis:
    """Dimension `dim` of a value holds the token axis of `n` tokens.

    When a reshape merged it with neighbours, the dimension's size is `outer * n * inner`:
    `inner` counts the elements folded inside each token step, `outer` those outside.
    """

    dim: int
    n: object
    inner: object = 1
    outer: object = 1

    @property
    def plain(self) -> bool:
        return same_size(self.inner, 1) and same_size(self.outer, 1)


def _shape(v) -> list[sympy.Expr] | None:
    if isinstance(v, torch.Tensor):
        return [to_expr(s) for s in v.shape]
    return None


def _element_shape(node: fx.Node) -> list | None:
    """Shape of a node's tensor, or of its elements when it returns a list (split)."""
    v = value(node)
    if isinstance(v, (list, tuple)) and v and isinstance(v[0], torch.Tensor):
        return _shape(v[0])
    return _shape(v)


def _norm(dim: int, r: int) -> int:
    return dim + r if dim < 0 else dim


def _broadcast_map(src: list, out: list) -> dict[int, int]:
    off = len(out) - len(src)
    return {i: i + off for i in range(len(src)) if same_size(src[i], out[i + off])}


def _arg_position(node: fx.Node, src: fx.Node) -> list:
    """Positions (int or kwarg name) at which `src` feeds `node`; list entries count as their slot."""
    pos = [i for i, a in enumerate(node.args) if a is src or (isinstance(a, (list, tuple)) and src in a)]
    pos += [k for k, a in node.kwargs.items() if a is src]
    return pos


def dim_map(node: fx.Node, src: fx.Node) -> dict[int, int] | None:
    """For a non-reshape op: which dimension of the output each dimension of `src` becomes."""
    name = op_name(node)
    s, o = _element_shape(src), _element_shape(node)
    if name == "getitem":
        return {i: i for i in range(len(o))} if o is not None and s is not None else None
    if s is None or o is None:
        return None
    positions = _arg_position(node, src)
    pos = positions[0] if positions else None
    r, R = len(s), len(o)
    if name in ELEMENTWISE:
        return _broadcast_map(s, o)
    if name in SAME_DIMS:
        return {i: i for i in range(r)} if r == R and pos in (0,) else None
    if name == "linear":
        return {i: i for i in range(r - 1)} if pos == 0 else None
    if name == "embedding":
        return {i: i for i in range(r)} if pos == 1 else None
    if name in ("mm", "addmm"):
        first = 0 if name == "mm" else 1
        if pos == first:
            return {0: 0}
        if pos == first + 1:
            return {1: 1}
        return _broadcast_map(s, o)
    if name in ("matmul", "bmm"):
        if r < 2:
            return None
        if pos == 0:
            return {i: i + R - r for i in range(r - 1)}
        if pos == 1:
            m = {i: i + R - r for i in range(r - 2) if same_size(s[i], o[i + R - r])}
            m[r - 1] = R - 1
            return m
        return None
    if name == "scaled_dot_product_attention":
        if pos == 0:
            return {i: i for i in range(r - 1)}
        if pos in (1, 2):
            m = {i: i for i in range(r - 2) if same_size(s[i], o[i])}
            if pos == 2:
                m[r - 1] = R - 1
            return m
        m = _broadcast_map(s, o)
        m.pop(r - 1, None)  # the key axis of a mask is contracted
        return m
    if name == "transpose":
        a, b = (_norm(int(d), r) for d in node.args[1:3])
        m = {i: i for i in range(r)}
        m[a], m[b] = b, a
        return m
    if name == "permute":
        dims = [_norm(int(d), r) for d in node.args[1]]
        return {d: j for j, d in enumerate(dims)}
    if name == "unsqueeze":
        d = _norm(int(node.args[1]), R)
        return {i: (i if i < d else i + 1) for i in range(r)}
    if name == "squeeze":
        if len(node.args) > 1:
            raw = node.args[1] if isinstance(node.args[1], (list, tuple)) else [node.args[1]]
            gone = {_norm(int(d), r) for d in raw if same_size(s[_norm(int(d), r)], 1)}
        else:
            gone = {i for i in range(r) if same_size(s[i], 1)}
        kept = [i for i in range(r) if i not in gone]
        return {i: j for j, i in enumerate(kept)}
    if name in ("expand", "expand_as"):
        return _broadcast_map(s, o)
    if name == "select":
        d = _norm(int(node.args[1]), r)
        return {i: (i if i < d else i - 1) for i in range(r) if i != d}
    if name in REDUCTIONS:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None:
            return {}
        dims = {_norm(int(d), r) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        keep = len(node.args) > 2 and bool(node.args[2]) or bool(node.kwargs.get("keepdim", False))
        kept = [i for i in range(r) if i not in dims]
        return {i: (i if keep else kept.index(i)) for i in kept}
    return None


def _reshape_forward(axis: Axis, s: list, o: list) -> Axis | None:
    """Place the token factor of `s` (contiguous strides) into a dimension of `o`."""
    stride = axis.inner * prod(s[axis.dim + 1:], start=sympy.Integer(1))
    for j in range(len(o) - 1, -1, -1):
        sj = prod(o[j + 1:], start=sympy.Integer(1))
        if divides(sj, stride) and divides(stride * axis.n, sj * o[j]):
            inner = sympy.cancel(stride / sj)
            outer = sympy.cancel(sj * o[j] / (stride * axis.n))
            return Axis(j, axis.n, _plain_int(inner), _plain_int(outer))
    return None


def _plain_int(e):
    return int(e) if getattr(e, "is_Integer", False) else e


def step_forward(node: fx.Node, src: fx.Node, axis: Axis) -> Axis | None:
    """The token axis of `node`'s value, given that `src` (one of its inputs) carries `axis`."""
    s, o = _element_shape(src), _element_shape(node)
    if s is None or o is None:
        return None
    if op_name(node) in RESHAPES:
        return _reshape_forward(axis, s, o) if _arg_position(node, src)[:1] == [0] else None
    m = dim_map(node, src)
    if m is None or axis.dim not in m:
        return None
    j = m[axis.dim]
    n = o[j] if axis.plain else axis.n
    return replace(axis, dim=j, n=n)


def step_backward(node: fx.Node, src: fx.Node, axis: Axis) -> Axis | None:
    """The token axis of input `src`, given that `node`'s value carries `axis`."""
    s, o = _element_shape(src), _element_shape(node)
    if s is None or o is None:
        return None
    if op_name(node) in RESHAPES:
        return _reshape_forward(axis, o, s) if _arg_position(node, src)[:1] == [0] else None
    m = dim_map(node, src)
    if m is None:
        return None
    inverse = {j: i for i, j in m.items()}
    if axis.dim not in inverse:
        return None
    i = inverse[axis.dim]
    n = s[i] if axis.plain else axis.n
    return replace(axis, dim=i, n=n)


def propagate(start: fx.Node, axis: Axis, forward: bool = True,
              within: Callable[[fx.Node], bool] = lambda n: True) -> dict[fx.Node, Axis]:
    """Every node reachable from `start` (users when forward, inputs when backward) that carries
    the token axis, with where it sits. `within` limits the walk (e.g. to one block)."""
    found = {start: axis}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        ax = found[node]
        nxt = node.users if forward else node.all_input_nodes
        for other in nxt:
            if other in found or not within(other):
                continue
            mapped = step_forward(other, node, ax) if forward else step_backward(node, other, ax)
            if mapped is not None:
                found[other] = mapped
                todo.append(other)
    return found
