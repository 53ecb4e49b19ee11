"""Shared fixtures: tiny transformers exported with torch.export (seconds each, cached per session)."""
from __future__ import annotations

import os

import pytest
import torch
import transformers as tf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels run on CPU tensors under its interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
DYN = torch.export.Dim.DYNAMIC


class TextEncoder(torch.nn.Module):
    """The encoder convention of DESIGN.md around any transformers text model."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        out = self.m(input_ids=input_ids, attention_mask=attention_mask)
        return {"last_hidden_state": out[0]}


class VisionEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, pixel_values):
        return {"last_hidden_state": self.m(pixel_values=pixel_values)[0]}


def text_inputs(batch=2, seq=12, vocab=300):
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1:
        mask[1, seq * 3 // 4:] = 0
    return torch.randint(3, vocab, (batch, seq)), mask


def export_text(model, dynamic=True, batch=2, seq=12):
    ids, mask = text_inputs(batch, seq)
    shapes = ({0: DYN, 1: DYN}, {0: DYN, 1: DYN}) if dynamic else None
    return torch.export.export(TextEncoder(model.eval()), (ids, mask), dynamic_shapes=shapes)


def export_vision(model, dynamic=True, image=32):
    shapes = ({0: DYN},) if dynamic else None
    return torch.export.export(VisionEncoder(model.eval()), (torch.randn(2, 3, image, image),), dynamic_shapes=shapes)


FAMILIES = {
    "bert": lambda impl: tf.BertModel._from_config(tf.BertConfig(vocab_size=300, **SMALL), attn_implementation=impl),
    "distilbert": lambda impl: tf.DistilBertModel._from_config(
        tf.DistilBertConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, hidden_dim=128), attn_implementation=impl),
    "albert": lambda impl: tf.AlbertModel._from_config(
        tf.AlbertConfig(vocab_size=300, embedding_size=32, **SMALL), attn_implementation=impl),
    "gpt2": lambda impl: tf.GPT2LMHeadModel._from_config(
        tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4), attn_implementation=impl),
    "llama": lambda impl: tf.LlamaForCausalLM._from_config(
        tf.LlamaConfig(vocab_size=300, num_key_value_heads=2, **SMALL), attn_implementation=impl),
}


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """`exported(family, impl="sdpa", dynamic=True)` -> path of a saved .pt2 (cached)."""
    cache = {}
    root = tmp_path_factory.mktemp("exported")

    def get(family: str, impl: str = "sdpa", dynamic: bool = True):
        key = (family, impl, dynamic)
        if key not in cache:
            torch.manual_seed(0)
            if family == "vit":
                model = tf.ViTModel._from_config(tf.ViTConfig(image_size=32, patch_size=8, **SMALL), attn_implementation=impl)
                ep = export_vision(model, dynamic)
            else:
                ep = export_text(FAMILIES[family](impl), dynamic)
            path = root / f"{family}-{impl}-{'dyn' if dynamic else 'static'}.pt2"
            torch.export.save(ep, path)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="session")
def tiny_decoder(tmp_path_factory):
    """A tiny Llama exported as a decoder folder (prefill.pt2 + decode.pt2) by the zoo."""
    from skimformer.zoo import export_zoo

    out = tmp_path_factory.mktemp("decoder") / "llama"
    export_zoo("llama", out, size="tiny")
    return out


@pytest.fixture(scope="session")
def one_layer_decoder(tmp_path_factory):
    """The tiny Llama cut to its first layer, exported as a decoder folder: for the compiling
    backends (AOTInductor, IREE), whose build time grows with the layers and whose checks do not."""
    from skimformer.zoo import build_model, export_model

    model = build_model("llama")
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    out = tmp_path_factory.mktemp("decoder") / "llama-1"
    export_model(model, out)
    return out


@pytest.fixture(scope="session")
def tiny_engine(tiny_decoder, tmp_path_factory):
    """`tiny_engine(passes=None, **backend_options)` -> the tiny Llama's ONNX Runtime engine,
    built once per session for each pipeline and options: a decoder build takes 10-20 s, and many
    tests read the same engine (they only read it: its folder and runners are shared)."""
    from skimformer import optimize

    cache, root = {}, tmp_path_factory.mktemp("engines")

    def get(passes: str | None = None, **options):
        key = (passes, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = optimize(tiny_decoder, passes, output=root / f"engine-{len(cache)}",
                                  backend_options=options or None)
        return cache[key]

    return get


class AttentionOnly(torch.nn.Module):
    """Two bare attention layers with no FFN, on `[B, n, 16]`; `residual=False` replaces the
    stream with attention's output instead of adding to it. Structures passes must refuse."""

    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 48) for _ in range(2))

    def forward(self, x):
        for qkv in self.layers:
            q, k, v = qkv(x).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            x = x + out if self.residual else out
        return x


def greedy_by_prefill(prefill, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy continuation of a one-row prompt by re-running a prefill program on the growing
    sequence: the reference for an engine's `generate`, which uses the cache instead."""
    ids = prompt
    for _ in range(steps):
        n = ids.shape[1]
        out = prefill.run({"input_ids": ids, "attention_mask": torch.ones(1, n, dtype=torch.long),
                           "position_ids": torch.arange(n)[None]})
        ids = torch.cat([ids, out["logits"][:, -1:].argmax(-1)], dim=1)
    return ids[:, prompt.shape[1]:]
