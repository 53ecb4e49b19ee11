"""The token axis is followed by dataflow, never by matching sizes."""
import torch

from skimformer.ir import Program
from skimformer.ir.graph import op_name
from skimformer.ir.token_axis import Axis, propagate


def _graph(module, *args, dynamic=None):
    return Program(torch.export.export(module, args, dynamic_shapes=dynamic)).ep.graph


def _placeholder(graph, name):
    return next(n for n in graph.nodes if n.op == "placeholder" and n.name == name)


def _axes(found):
    return {n.name: a.dim for n, a in found.items()}


class Conv1DStyle(torch.nn.Module):
    """GPT-2's Conv1D: fold batch and tokens together, project, unfold."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(16, 16))
        self.b = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        b, n, c = x.shape
        y = torch.addmm(self.b, x.reshape(-1, c), self.w)
        return y.view(b, n, 16).transpose(0, 1)


def test_through_batch_token_fold():
    # 16 tokens with 16 features: a size match would be ambiguous, the dataflow is not.
    g = _graph(Conv1DStyle(), torch.randn(3, 16, 16))
    x = _placeholder(g, "x")
    found = propagate(x, Axis(1, 16))
    by_op = {op_name(n): a for n, a in found.items()}
    assert by_op["reshape"].dim == 0 and by_op["reshape"].inner == 1 and by_op["reshape"].outer == 3
    assert by_op["view"].dim == 1 and by_op["view"].plain
    assert by_op["transpose"].dim == 0


class HeadSplit(torch.nn.Module):
    def forward(self, x):
        b, n, _ = x.shape
        q = x.view(b, n, 4, 4).transpose(1, 2)
        return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(b, n, 16)


class ClsConcat(torch.nn.Module):
    def forward(self, x, cls):
        return torch.cat([cls.expand(x.shape[0], -1, -1), x], dim=1).mean(dim=1)


class TokenMajor(torch.nn.Module):
    def forward(self, x):
        q = x.transpose(0, 1).unsqueeze(0)  # x is [N, B, C]
        return torch.nn.functional.scaled_dot_product_attention(q, q, q)


def test_head_split_and_attention():
    g = _graph(HeadSplit(), torch.randn(2, 4, 16))  # n == heads == head_dim == 4
    found = propagate(_placeholder(g, "x"), Axis(1, 4))
    names = {op_name(n): a.dim for n, a in found.items()}
    assert names["view"] == 1 and names["scaled_dot_product_attention"] == 2 and names["reshape"] == 1


def test_symbolic_sizes_and_concat_changes_count():
    d = torch.export.Dim.DYNAMIC
    g = _graph(ClsConcat(), torch.randn(2, 5, 8), torch.randn(1, 1, 8), dynamic=({0: d, 1: d}, None))
    x = _placeholder(g, "x")
    found = propagate(x, Axis(1, x.meta["val"].shape[1]))
    cat = next(n for n in found if op_name(n) == "cat")
    assert str(found[cat].n) == f"{x.meta['val'].shape[1]} + 1"
    assert not any(op_name(n) == "mean" for n in found)  # the token axis is reduced away


def test_backward_from_queries_reaches_the_input():
    g = _graph(TokenMajor(), torch.randn(6, 3, 8))
    sdpa = next(n for n in g.nodes if op_name(n) == "scaled_dot_product_attention")
    found = propagate(sdpa.args[0], Axis(2, 6), forward=False)
    assert found[_placeholder(g, "x")].dim == 0  # tokens lead in x: [N, B, C]
