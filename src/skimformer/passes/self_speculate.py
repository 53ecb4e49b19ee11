"""self-speculate: LayerSkip-style self-speculative decoding (Elhoushi et al., ACL 2024,
arXiv 2404.16710), reimplemented from the paper. Lossless: the tokens are those of greedy decoding
with the full model.

The decode program is split at block `exit` into two programs beside prefill and decode:

- `draft`: the first `exit` blocks, then the model's own final norm and LM head applied to their
  output (the head is replayed from the graph, `ir.exits`). It returns `logits`, the cache of the
  first `exit` layers, and `hidden_states`: the residual stream entering block `exit`.
- `verify`: blocks `exit..N-1` and the head, reading `hidden_states` in place of the tokens. The
  draft already computed the first `exit` layers for every drafted token, so verification reuses
  their hidden states and their cache (LayerSkip's exit-layer cache reuse) and runs only the
  remaining layers, over `draft + 1` positions in one call.

`Engine.generate` runs the loop (`backends.speculation`): draft `draft` tokens one at a time,
verify them at once, keep the longest prefix the full model agrees with plus its own next token,
and trim every cache back to the kept tokens. A batch keeps the prefix every row agrees on.
The decode program stays, unchanged, for plain decoding.

Ordering: on a plain growing cache only (it trims the cache when drafts are rejected), so not
after KV passes that compress, quantize or carry state; not with early-exit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.attention import find_attention
from skimformer.ir.blocks import find_blocks
from skimformer.ir.exit_heads import ExitHeads
from skimformer.ir.exits import adapter_input, replay
from skimformer.ir.graph import descendants
from skimformer.ir.rewrite import reexport
from skimformer.ir.signature import (add_input, input_nodes, named_outputs, output_node, removable_inputs,
                                     remove_inputs, set_outputs)
from skimformer.passes.base import ModelResult, Pass
from skimformer.passes.kv_rewrite import MASK, require_decoder
from skimformer.passes.registry import register

NAME = "self-speculate"
HIDDEN = "hidden_states"
DYN = torch.export.Dim.DYNAMIC


@dataclass
class SelfSpeculateConfig:
    exit: int = 8
    draft: int = 4
    heads: str | None = None  # `skimformer calibrate` adapters: the draft's head reads adapter `exit - 1`

    def __post_init__(self):
        if self.exit < 1:
            raise ValueError(f"exit is the number of blocks that draft (>= 1); got {self.exit}")
        if self.draft < 1:
            raise ValueError(f"draft is the number of tokens drafted per verification (>= 1); got {self.draft}")


def _layer(name: str) -> int:
    return int(name.rsplit("_", 1)[1])


def _split(decode: Program, exit_at: int, heads: ExitHeads | None) -> tuple[Program, Program]:
    """The draft and verify programs (module docstring) cut from the decode program."""
    draft_module, verify_module = decode.ep.module(), decode.ep.module()

    graph = draft_module.graph
    blocks = find_blocks(graph, find_attention(graph), set())
    if exit_at >= len(blocks):
        raise UserError(f"{NAME}: exit={exit_at}, but the model has {len(blocks)} blocks: draft with fewer "
                        f"(1..{len(blocks) - 1})")
    if any(b.input is None or b.output is None for b in blocks):
        raise UserError(f"{NAME}: a block has no residual stream in and out, so the model cannot be split")
    outputs = named_outputs(draft_module)
    hidden = blocks[exit_at].input
    skipped = [b.input for b in blocks[exit_at + 1:]] + [blocks[-1].output]
    with graph.inserting_before(output_node(draft_module)):
        head_reads = hidden
        if heads is not None:
            adapter = adapter_input(draft_module, "draft_adapter", *heads.adapters[exit_at - 1], hidden)
            head_reads = adapter(graph, hidden)
        logits = replay(graph, [outputs["logits"]], {n: head_reads for n in skipped}, descendants([hidden]))[0]
    kept = {k: v for k, v in outputs.items() if k.startswith("present_") and _layer(k) < exit_at}
    set_outputs(draft_module, {"logits": logits, **kept, HIDDEN: hidden})
    remove_inputs(draft_module, removable_inputs(draft_module))
    draft = _reexport(decode, draft_module, "draft", {})

    graph = verify_module.graph
    blocks = find_blocks(graph, find_attention(graph), set())
    outputs = named_outputs(verify_module)
    fed = add_input(verify_module, HIDDEN, blocks[exit_at].input.meta.get("val"))
    blocks[exit_at].input.replace_all_uses_with(fed)
    set_outputs(verify_module, {k: v for k, v in outputs.items() if not (k.startswith("present_") and _layer(k) < exit_at)})
    remove_inputs(verify_module, removable_inputs(verify_module))
    examples = {**decode.example_inputs, HIDDEN: draft.run(draft.example_inputs)[HIDDEN]}
    verify = _reexport(decode, verify_module, "verify", examples, {HIDDEN: {0: DYN, 1: DYN}})
    return draft, verify


def _reexport(decode: Program, module, role: str, examples: dict, dims: dict | None = None) -> Program:
    names = list(input_nodes(module))
    inputs = {n: (examples or decode.example_inputs)[n] for n in names}
    program = reexport(decode, module, inputs, dims)
    return Program(ep=program.ep, role=role, example_inputs=program.example_inputs)


def _check_plain_cache(model: Model) -> None:
    decode = model.programs["decode"]
    extra = [n for n in decode.output_names if n != "logits" and not (
        n.startswith(("present_key_", "present_value_")) and n.rsplit("_", 1)[1].isdigit())]
    if extra or MASK in decode.output_names:
        raise UserError(f"{NAME} trims the KV cache when drafts are rejected, so it needs a plain growing cache; "
                        f"this decode program also returns {', '.join(extra)} (from an earlier pass): "
                        f"apply {NAME} without KV compression or early-exit")


@register
class SelfSpeculate(Pass):
    """LayerSkip self-speculation: the first blocks draft, the rest verify (lossless)."""

    name = NAME
    Config = SelfSpeculateConfig
    lossless = True

    def apply_model(self, model: Model, config: SelfSpeculateConfig) -> ModelResult:
        require_decoder(model, NAME)
        if "draft" in model.programs:
            raise UserError(f"{NAME} was applied twice: the model already has a draft program")
        _check_plain_cache(model)
        heads = ExitHeads.load(config.heads) if config.heads else None
        if heads is not None and (heads.kind != "decoder" or config.exit - 1 not in heads.adapters):
            raise UserError(f"{NAME}: exit={config.exit} drafts from block {config.exit - 1}'s output, and "
                            f"{config.heads} has decoder adapters for blocks {heads.at if heads.kind == 'decoder' else []}: "
                            f"calibrate that exit (`skimformer calibrate MODEL --at {config.exit - 1}`)")
        draft, verify = _split(model.programs["decode"], config.exit, heads)
        report = {"exit": config.exit, "draft": config.draft, "programs": ["draft", "verify"], "adapter": bool(heads),
                  "cache_reuse": "verify reads the draft's hidden states and cache of the first `exit` layers",
                  "batch_rule": "a batch keeps the drafted prefix that every row agrees with"}
        rewritten = model.replace({**model.programs, "draft": draft, "verify": verify})
        rewritten.generation["draft"] = config.draft
        return ModelResult(rewritten, report, 1)
