"""Rotary tables read off a model's own rotation (`ir.rotary`): which form, which values, and
which rotations have no tables a fused kernel could take."""
import pytest
import torch

from skimformer import load
from skimformer.ir.rotary import find_rotary, rotary_candidates, rotates_by

HEADS, HEAD_DIM = 2, 8


class Rotation(torch.nn.Module):
    """`x [B,H,S,D]` rotated at `positions [B,S]`: rotate-half, interleaved (GPT-J), or partial
    (rotate-half on the first `rotary_dim` channels, the rest passed through, as GPT-NeoX)."""

    def __init__(self, form: str, rotary_dim: int = HEAD_DIM):
        super().__init__()
        self.form, self.rotary_dim = form, rotary_dim
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))

    def forward(self, x, positions):
        freqs = positions[..., None].float() * self.inv_freq  # [B, S, R/2]
        part, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        if self.form == "interleaved":
            cos, sin = freqs.cos().repeat_interleave(2, -1)[:, None], freqs.sin().repeat_interleave(2, -1)[:, None]
            swapped = torch.stack([-part[..., 1::2], part[..., 0::2]], dim=-1).flatten(-2)
        else:
            cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
            half = self.rotary_dim // 2
            swapped = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
        rotated = part * cos + swapped * sin
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


def _rotary_of(module: torch.nn.Module):
    ep = torch.export.export(module, (torch.randn(1, HEADS, 5, HEAD_DIM), torch.arange(5)[None]))
    graph_module = ep.module()
    nodes = list(graph_module.graph.nodes)
    positions = next(n for n in nodes if n.op == "placeholder" and n.name == "positions")
    rotated = next(n for n in nodes if n.op == "output").args[0][0]
    return graph_module, find_rotary(graph_module.graph, rotated, positions)


def _accepted(module: torch.nn.Module):
    graph_module, rotary = _rotary_of(module)
    if rotary is None:
        return []
    return [t for t in rotary_candidates(graph_module, rotary, 64) if rotates_by(graph_module, rotary, t, 1e-5)]


@pytest.mark.parametrize("form", ["rotate-half", "interleaved"])
def test_the_tables_of_a_whole_head_rotation_are_its_cos_and_sin_in_its_form(form):
    accepted = _accepted(Rotation(form))
    assert [t.interleaved for t in accepted] == [form == "interleaved"]
    angles = torch.arange(64)[:, None] * (1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
    torch.testing.assert_close(accepted[0].cos, angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(accepted[0].sin, angles.sin(), atol=1e-6, rtol=0)


def test_a_partial_rotation_has_no_whole_head_tables():
    """GPT-NeoX rotates a quarter of the head dim: neither form's tables reproduce it, so a
    kernel that rotates the whole head must not be given them."""
    assert _accepted(Rotation("rotate-half", rotary_dim=HEAD_DIM // 2)) == []


def test_a_transformers_llama_has_rotate_half_tables_shared_by_queries_and_keys(tiny_decoder):
    module = load(tiny_decoder).programs["decode"].ep.module()
    nodes = {n.name: n for n in module.graph.nodes}
    attention = next(n for n in module.graph.nodes if n.name.startswith("scaled_dot_product_attention"))
    query = find_rotary(module.graph, attention.args[0], nodes["position_ids"])
    assert query is not None
    (tables,) = [t for t in rotary_candidates(module, query, 128) if rotates_by(module, query, t, 1e-5)]
    assert not tables.interleaved and tables.cos.shape == (128, 8)  # the tiny Llama's head dim is 16
