"""Reference models from transformers configs: tiny ones for tests, realistic ones for benchmarks.

Random weights (seeded) are enough to test rewrites and to time them: shapes and graph structure
are what matter there. Realistic sizes are the standard ones, so timings compare with published
figures.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

from skimformer.errors import UserError
from skimformer.zoo.hf_export import export_model

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
SIZES = ("tiny", "realistic")

CONFIGS = {
    ("vit", "tiny"): lambda: (tf.ViTConfig(image_size=32, patch_size=8, **TINY), tf.ViTModel),
    ("vit", "realistic"): lambda: (tf.ViTConfig(), tf.ViTModel),  # ViT-B/16 at 224 px
    ("bert", "tiny"): lambda: (tf.BertConfig(vocab_size=300, **TINY), tf.BertModel),
    ("bert", "realistic"): lambda: (tf.BertConfig(), tf.BertModel),  # BERT-base
    ("gpt2", "tiny"): lambda: (tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=256),
                               tf.GPT2LMHeadModel),
    ("gpt2", "realistic"): lambda: (tf.GPT2Config(), tf.GPT2LMHeadModel),  # GPT-2 124M, 12 layers
    ("llama", "tiny"): lambda: (tf.LlamaConfig(vocab_size=300, num_key_value_heads=2, max_position_embeddings=256,
                                               **TINY), tf.LlamaForCausalLM),
    # 12 layers, hidden 768, GQA with 12 query and 4 key/value heads.
    ("llama", "realistic"): lambda: (tf.LlamaConfig(vocab_size=32000, hidden_size=768, num_hidden_layers=12,
                                                    num_attention_heads=12, num_key_value_heads=4,
                                                    intermediate_size=2048), tf.LlamaForCausalLM),
}
FAMILIES = tuple(sorted({family for family, _ in CONFIGS}))


def build_model(family: str, size: str = "tiny", seed: int = 0) -> torch.nn.Module:
    """A zoo model with random weights drawn with `seed`, fp32, eval mode, sdpa attention."""
    if (family, size) not in CONFIGS:
        raise UserError(f"no zoo model {family!r} of size {size!r}; families: {', '.join(FAMILIES)}; "
                        f"sizes: {', '.join(SIZES)}")
    config, cls = CONFIGS[(family, size)]()
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="sdpa").float().eval()


def export_zoo(family: str, out_dir: str | Path, size: str = "tiny", batch: int = 2, seq_len: int = 16,
               static: bool = False, force: bool = False) -> list[Path]:
    """Build a zoo model and export it like `skimformer export` (model.pt2, or prefill.pt2 + decode.pt2)."""
    return export_model(build_model(family, size), out_dir, batch=batch, seq_len=seq_len, static=static, force=force)
