"""What every KV-cache pass shares: find each layer's cache in a decoder program, rewrite the
prefill and decode programs in turn, and keep the decode program's examples consistent.

A causal LM's cache leaves a program as `present_key_{i}` / `present_value_{i}` and enters the
next step as `past_key_{i}` / `past_value_{i}` (DESIGN.md). KV passes rewrite what a program
returns there (a shorter cache, integer codes and scales, extra `state_*` tensors), so the
decode program's inputs change with the prefill's outputs: after the prefill is rewritten, the
decode program's example inputs are rebuilt from the rewritten prefill's real outputs, exactly
as the engine feeds them, and the decode rewrite is traced on those.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import sympy
import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.attention import AttentionSite, find_attention
from skimformer.ir.graph import op_name
from skimformer.ir.kv_cache import KV_MOVES
from skimformer.ir.rewrite import reexport
from skimformer.ir.signature import carried_input, input_nodes, named_outputs
from skimformer.ir.sizes import to_expr
from skimformer.passes.base import ModelResult

MASK = "attention_mask"
DYN = torch.export.Dim.DYNAMIC


@dataclass
class CacheLayer:
    """One layer's cache in a program being rewritten (nodes of `ep.module()`'s graph)."""

    index: int
    key: fx.Node  # what the program returns as present_key_{index}: [B, H_kv, T, D]
    value: fx.Node
    past_key: fx.Node | None  # the decode program's past_key_{index} input (None in prefill)
    past_value: fx.Node | None
    attention: AttentionSite  # the attention that reads this layer's keys and values


def reaches(start: fx.Node, target: fx.Node) -> bool:
    """Whether `target` feeds `start` through data movement alone (repeat_kv, reshapes, casts)."""
    todo, seen = [start], set()
    while todo:
        node = todo.pop()
        if node is target:
            return True
        if node in seen or (node is not start and op_name(node) not in KV_MOVES):
            continue
        seen.add(node)
        todo.extend(a for a in node.all_input_nodes if a.op != "get_attr")
    return False


def cache_layers(module: fx.GraphModule, pass_name: str) -> list[CacheLayer]:
    """Each layer's present key/value, past inputs and attention site; refused with a reason when
    the program does not follow the decoder convention."""
    outputs, inputs = named_outputs(module), input_nodes(module)
    sites = find_attention(module.graph)
    layers = []
    # every layer the program returns a cache for: a verify program's start after the draft's
    for i in sorted(int(name.removeprefix("present_key_")) for name in outputs
                    if name.startswith("present_key_") and name.removeprefix("present_key_").isdigit()):
        key, value = outputs[f"present_key_{i}"], outputs.get(f"present_value_{i}")
        if value is None:
            raise UserError(f"{pass_name}: the program returns present_key_{i} without present_value_{i}")
        site = next((s for s in sites if reaches(s.k, key) and reaches(s.v, value)), None)
        if site is None and any(n.target is torch.ops.higher_order.cond for n in module.graph.nodes):
            raise UserError(f"{pass_name}: layer {i}'s attention lies inside an exit's torch.cond (early-exit or "
                            f"self-speculate ran first): put {pass_name} before the exit pass in the pipeline")
        if site is None:
            raise UserError(f"{pass_name}: no attention reads the cache of layer {i} (present_key_{i}) as it is "
                            "written; export the model with `skimformer export`")
        layers.append(CacheLayer(i, key, value, inputs.get(f"past_key_{i}"), inputs.get(f"past_value_{i}"), site))
    if not layers:
        raise UserError(f"{pass_name}: the program returns no present_key_*/present_value_* cache outputs "
                        "(decoder convention: export the model with `skimformer export`)")
    return layers


def require_decoder(model: Model, pass_name: str) -> None:
    if not model.is_decoder:
        raise UserError(f"{pass_name} compresses a causal LM's KV cache, and this model is an encoder (no prefill "
                        "and decode programs): give a decoder folder written by `skimformer export`")


def output_dims(program: Program) -> dict[str, dict[int, object]]:
    """Per output, the dimensions that are symbolic: those stay dynamic where the output is fed back."""
    dims = {}
    for spec in program.output_specs():
        dims[spec["name"]] = {i: DYN for i, s in enumerate(spec["shape"]) if isinstance(s, str)}
    return dims


def decode_examples(prefill: Program, decode: Program) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The decode program's example inputs continued from the (rewritten) prefill's real outputs,
    as the engine feeds them: its cache and state, and the mask of the cache it returned (or of
    the prompt) grown by the step's new tokens; with the dynamic dims of each fed-back input."""
    out = prefill.run(prefill.example_inputs)
    old = decode.example_inputs
    new_tokens = old["input_ids"].shape[1]
    mask = out.get(MASK, prefill.example_inputs[MASK])
    grown = torch.cat([mask, torch.ones(mask.shape[0], new_tokens, dtype=mask.dtype)], dim=1)
    inputs = {"input_ids": old["input_ids"], MASK: grown, "position_ids": old["position_ids"]}
    dims = {}
    out_dims = output_dims(prefill)
    for name, value in out.items():
        fed = carried_input(name)
        if fed is not None:
            inputs[fed] = value
            dims[fed] = out_dims[name]
    return inputs, dims


def rewrite_decoder(model: Model, pass_name: str,
                    rewrite: Callable[[Program, dict[str, torch.Tensor] | None, dict | None], tuple[Program, dict]]
                    ) -> ModelResult:
    """Rewrite the prefill program, then the decode program traced on inputs continued from the
    new prefill. `rewrite(program, inputs, dims)` returns the rewritten program and its report;
    `inputs`/`dims` (None for prefill) are the decode program's new example inputs and the
    dynamic dims of inputs it may not have had yet."""
    require_decoder(model, pass_name)
    prefill, prefill_report = rewrite(model.programs["prefill"], None, None)
    inputs, dims = decode_examples(prefill, model.programs["decode"])
    decode, decode_report = rewrite(model.programs["decode"], inputs, dims)
    programs = {**model.programs, "prefill": prefill, "decode": decode}
    return ModelResult(model.replace(programs), {"prefill": prefill_report, "decode": decode_report}, 1)


def reexport_decoder_program(program: Program, module: fx.GraphModule, inputs: dict | None, dims: dict | None) -> Program:
    """Re-export an edited prefill (own examples) or decode program (examples continued from the
    rewritten prefill)."""
    module.graph.eliminate_dead_code()
    return reexport(program, module, inputs, dims)


def replace_guards(module: fx.GraphModule, same: list[tuple[tuple[fx.Node, int], tuple[fx.Node, int]]] = ()) -> None:
    """Drop `ep.module()`'s check of the old inputs and assert, in its place, which inputs share
    a size, for passes that change the cache's representation; `same` adds pairs of (input,
    dimension) that a pass knows to be equal among its new inputs.

    The export's `_guards_fn` checks the cache's dtype and head dim, which such a pass changes,
    but it also told the re-export, before any op ran, that all inputs have one batch size and
    the ids and positions one token count. Without that the exporter meets the sizes in graph
    order: GPT-2's first reshape of its QKV projection, `[B*n, 3C]` to `[B, n, 3C]`, traced
    before the cache's batch is known to be the ids' batch, records `B != B*n`, which refuses
    every one-token decode step. So the equalities come first again (`torch._assert`, as the
    guard function does); sums such as the mask's `past + n` are left out, since a pass may
    change what the cache's token axis counts (KIVI's codes hold only the quantized tokens).
    Equal sizes also trace as one symbol, so the layers' cache ops have one form (decomposed
    once by the backends) instead of one per layer.
    """
    graph = module.graph
    for guard in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(guard)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    first: dict[sympy.Symbol, tuple[fx.Node, int]] = {}
    pairs = []
    for node in placeholders:
        for dim, size in enumerate(getattr(node.meta.get("val"), "shape", ())):
            symbol = to_expr(size)
            if isinstance(symbol, sympy.Symbol):
                pairs.append(((node, dim), first.setdefault(symbol, (node, dim))))
    with graph.inserting_before(placeholders[-1].next):
        for (node, dim), (other, other_dim) in [*pairs, *same]:
            if (node, dim) == (other, other_dim):
                continue
            equal = graph.call_function(operator.eq, (graph.call_function(torch.ops.aten.sym_size.int, (node, dim)),
                                                      graph.call_function(torch.ops.aten.sym_size.int, (other, other_dim))))
            graph.call_function(torch._assert, (equal, f"{node.target}.size({dim}) must equal "
                                                       f"{other.target}.size({other_dim})"))


def cache_bytes(outputs: dict[str, torch.Tensor]) -> int:
    """Bytes of every tensor a step hands to the next one (cache, its companions, state)."""
    return sum(v.numel() * v.element_size() for k, v in outputs.items() if carried_input(k))
