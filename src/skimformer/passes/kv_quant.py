"""kv-quant: KIVI quantization of a causal LM's KV cache (Liu et al., "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", ICML 2024, arXiv 2402.02750). Lossy.

Keys are quantized per channel (outliers live in a few channels: `group` consecutive tokens
share one scale and zero per channel), values per token (`group` channels, or the largest
divisor of the head dim below it, share one per token); asymmetric, round-to-nearest, `bits`
8, 4 or 2, the codes packed into uint8 along the head dim. The newest `residual` tokens (up to
`residual + group - 1`) stay in full precision: a key group needs `group` tokens before it can be
quantized, and recent tokens draw most attention. Whenever the full-precision tail is long
enough, its oldest whole groups are quantized and appended; tokens already quantized are never
quantized again.

The cache keeps its names, with companions (DESIGN.md), per layer i:
`present_key_{i}` (uint8 codes `[B, H_kv, Q, D * bits / 8]`), `present_key_scale_{i}` and
`present_key_zero_{i}` (`[B, H_kv, Q / group, D]`), `present_key_residual_{i}` (full precision
`[B, H_kv, R, D]`), and the same for values (scale and zero `[B, H_kv, Q, D / channels]`); the
decode program takes them back as `past_*`, so the engine threads them unchanged. The mask
`[B, Q + R + n]` covers the quantized tokens, then the tail, then the step's new tokens: the
cache's original order. The prefill program runs as before and quantizes the cache it returns
(`skim::kv_quantize`); the decode program attends in one `skim::quant_attention` per layer over
the codes and the tail grown by the step's tokens, in place of the SDPA that read the cache, and
returns the cache updated by `skim::kv_append`. With `residual` at least as long as any cache,
nothing is quantized and the outputs are the original ones.

Ordering: after passes that only shorten the cache the prefill returns (`prompt-prune`,
`kv-evict(policy=snapkv|knorm)`): the decode program then simply starts from a shorter past.
Refused after passes that rewrite the decode-time cache (`kv-window`, `kv-evict(policy=h2o)`),
which read or gather the full-precision cache each step, and when applied twice. The decode
program's attention must be fused SDPA (what `skimformer export` writes).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.attention import sdpa_mask
from skimformer.ir.graph import op_name
from skimformer.ir.rewrite import tag
from skimformer.ir.signature import add_input, named_outputs, set_outputs
from skimformer.ir.sizes import to_expr
from skimformer.kernels import quant  # noqa: F401  (registers the skim ops)
from skimformer.passes import kv_quant_channel
from skimformer.passes.base import Exercise, ModelResult, Pass
from skimformer.passes.kv_rewrite import (CacheLayer, reaches, cache_bytes, cache_layers,
                                          reexport_decoder_program, replace_guards, rewrite_decoder)
from skimformer.passes.registry import register

NAME = "kv-quant"
MASK = "attention_mask"
# A layer's cache as the programs pass it on, after its key or value tensor (`present_key_{i}`).
PARTS = ("scale", "zero", "residual")
ORDER = ("put kv-quant after passes that only shorten the prefill's cache (prompt-prune, "
         "kv-evict(policy=snapkv|knorm)), and do not combine it with kv-window or kv-evict(policy=h2o)")
skim = torch.ops.skim


SCHEMES = ("kivi", "channel")


@dataclass
class KVQuantConfig:
    bits: int = 4
    group: int = 32
    residual: int = 128
    scheme: str = "kivi"

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme must be kivi (exact KIVI, any backend) or channel (per-channel scales, ONNX "
                             f"Runtime's fused quantized cache); got {self.scheme}")
        if self.scheme == "channel" and self.bits not in (4, 8):
            raise ValueError(f"scheme=channel takes bits 8 or 4; got {self.bits}")
        if self.bits not in (2, 4, 8):
            raise ValueError(f"bits must be 8, 4 or 2; got {self.bits}")
        if self.group < 1:
            raise ValueError(f"group (tokens or channels that share a scale) must be >= 1; got {self.group}")
        if self.residual < 0:
            raise ValueError(f"residual (newest tokens kept in full precision) must be >= 0; got {self.residual}")


def _names(kind: str, i: int) -> dict[str, str]:
    """Output names of one layer's key or value cache: the codes under the original name."""
    return {"codes": f"present_{kind}_{i}", **{p: f"present_{kind}_{p}_{i}" for p in PARTS}}


def _head_dim(node: fx.Node) -> int:
    d = node.meta["val"].shape[-1]
    if not isinstance(d, int) and not (isinstance(d, torch.SymInt) and d.node.is_constant()):
        raise UserError(f"{NAME}: the head dim of {node.name} is not static")
    return int(d)


def _channels(config: KVQuantConfig, head_dim: int) -> int:
    """Channels that share a value scale: `group`, or the largest divisor of the head dim below it."""
    return math.gcd(config.group, head_dim)


def _check_head_dim(config: KVQuantConfig, head_dim: int) -> None:
    if head_dim * config.bits % 8:
        raise UserError(f"{NAME}(bits={config.bits}): the head dim {head_dim} does not pack into whole bytes")


def _quantize_outputs(graph: fx.Graph, index: int, present: dict[str, fx.Node], config: KVQuantConfig, op,
                      first_args: dict[str, tuple]) -> dict[str, fx.Node]:
    """Layer `index`'s cache outputs: `op`'s codes, scale, zero and tail for its `present` key and value."""
    new = {}
    for kind, node in present.items():
        d = _head_dim(node)
        _check_head_dim(config, d)
        channels = 0 if kind == "key" else _channels(config, d)
        with graph.inserting_before(next(n for n in graph.nodes if n.op == "output")):
            call = tag(graph.call_function(op, (*first_args[kind], config.bits, config.group, config.residual,
                                                channels)), NAME)
            parts = [tag(graph.call_function(operator.getitem, (call, j)), NAME) for j in range(4)]
        new.update(zip(_names(kind, index).values(), parts))
    return new


def _with_layers(outputs: dict[str, fx.Node], layers: dict[str, fx.Node]) -> dict[str, fx.Node]:
    """The outputs with each `present_{kind}_{i}` expanded, in place, into its four tensors."""
    result = {}
    for name, node in outputs.items():
        if name in layers:
            kind, i = name.removeprefix("present_").rsplit("_", 1)
            result.update({n: layers[n] for n in _names(kind, int(i)).values()})
        else:
            result[name] = node
    return result


def _refuse_quantized(names, role: str) -> None:
    if any("_scale_" in n or "_residual_" in n for n in names):
        raise UserError(f"{NAME}: the {role} program's cache is already quantized (it has *_scale_* tensors); "
                        f"apply {NAME} once")


def _quantize_prefill(program: Program, config: KVQuantConfig) -> Program:
    """The prefill attends in full precision as before and returns its cache quantized."""
    _refuse_quantized(program.output_names, "prefill")
    module = program.ep.module()
    outputs, new, i = named_outputs(module), {}, 0
    # By name, not through the attention that reads them: a pass before this one may have
    # gathered the returned cache after attention (kv-evict's SnapKV, prompt-prune).
    while f"present_key_{i}" in outputs and f"present_value_{i}" in outputs:
        present = {"key": outputs[f"present_key_{i}"], "value": outputs[f"present_value_{i}"]}
        new.update(_quantize_outputs(module.graph, i, present, config, skim.kv_quantize.default,
                                     {kind: (node,) for kind, node in present.items()}))
        i += 1
    if not new:
        raise UserError(f"{NAME}: the prefill program returns no present_key_*/present_value_* cache outputs "
                        "(decoder convention: export the model with `skimformer export`)")
    set_outputs(module, _with_layers(outputs, new))
    return reexport_decoder_program(program, module, None, None)


def _new_tokens(present: fx.Node, past: fx.Node, layer: int) -> fx.Node:
    """The step's new keys (or values) in `present = cat([past, new], dim=-2)`."""
    args = present.args[0] if op_name(present) == "cat" and present.args else None
    dim = present.args[1] if len(present.args) > 1 else present.kwargs.get("dim", 0)
    if args is None or len(args) != 2 or dim % 4 != 2 or not reaches(args[0], past) or reaches(args[1], past):
        raise UserError(f"{NAME}: the decode program does not write layer {layer}'s cache as cat(past, new): a pass "
                        f"before it changed the decode-time cache, which {NAME} cannot build on; {ORDER}")
    return args[1]


def _fused(layer: CacheLayer):
    site = layer.attention
    node = site.node
    if site.kind != "fused":
        raise UserError(f"{NAME}: the decode program's attention of layer {layer.index} is not fused SDPA: "
                        "run canonicalize-attention first, or export the model with `skimformer export`")
    if node.kwargs.get("is_causal") or (len(node.args) > 5 and node.args[5]) or node.kwargs.get("dropout_p"):
        raise UserError(f"{NAME}: the decode program's attention of layer {layer.index} is causal or has dropout "
                        "without an explicit mask; export the model with `skimformer export`")
    scale = node.kwargs.get("scale")
    return site, scale if scale is not None else 1.0 / math.sqrt(_head_dim(site.q))


def _quantize_decode(program: Program, config: KVQuantConfig, inputs: dict, dims: dict) -> Program:
    """Attention over the quantized cache and its full-precision tail, and the cache appended to."""
    _refuse_quantized(program.input_names, "decode")
    module = program.ep.module()
    graph = module.graph
    layers = cache_layers(module, NAME)
    new, parts_of = {}, {}
    for layer in layers:
        if layer.past_key is None or layer.past_value is None:
            raise UserError(f"{NAME}: the decode program has no past_key_{layer.index}/past_value_{layer.index} input")
        site, scale = _fused(layer)
        state = {}
        for kind, past, present in (("key", layer.past_key, layer.key), ("value", layer.past_value, layer.value)):
            names = _names(kind, layer.index)
            fresh = _new_tokens(present, past, layer.index)
            parts = {"codes": past, **{p: add_input(module, names[p].replace("present_", "past_", 1)) for p in PARTS}}
            with graph.inserting_before(site.node):
                tail = tag(graph.call_function(torch.ops.aten.cat.default, ([parts["residual"], fresh], 2)), NAME)
            state[kind] = (parts, tail)
            parts_of[layer.index, kind] = parts
            _length_from_parts(graph, past, parts)
        (kp, ktail), (vp, vtail) = state["key"], state["value"]
        channels = _channels(config, _head_dim(layer.value))
        with graph.inserting_before(site.node):
            attn = tag(graph.call_function(skim.quant_attention.default, (
                site.q, kp["codes"], kp["scale"], kp["zero"], vp["codes"], vp["scale"], vp["zero"], ktail, vtail,
                sdpa_mask(site.node), scale, config.bits, config.group, channels)), NAME)
        site.node.replace_all_uses_with(attn)
        graph.erase_node(site.node)
        present = {"key": layer.key, "value": layer.value}
        new.update(_quantize_outputs(graph, layer.index, present, config, skim.kv_append.default, {
            "key": (kp["codes"], kp["scale"], kp["zero"], ktail),
            "value": (vp["codes"], vp["scale"], vp["zero"], vtail)}))
    set_outputs(module, _with_layers(named_outputs(module), new))
    # the export's checks of the old inputs (the head dim of past_key_*) give way to the sizes' equalities
    replace_guards(module, _equal_sizes(layers, parts_of))
    graph.eliminate_dead_code()
    for layer in layers:
        for past in (layer.past_key, layer.past_value):
            left = [u for u in past.users if not _size_of(u, (0, 1, 2))
                    and u.target not in (skim.quant_attention.default, skim.kv_append.default)]
            if left:
                raise UserError(f"{NAME}: the decode program reads {past.target} as a full-precision cache in "
                                f"{left[0].name} (a pass before it uses the decode-time cache); {ORDER}")
    traced = reexport_decoder_program(program, module, _traceable(inputs, config.group), dims)
    return Program(ep=traced.ep, role=program.role, example_inputs={n: inputs[n] for n in traced.input_names})


def _equal_sizes(layers: list[CacheLayer], parts_of: dict) -> list:
    """Sizes of the split caches that are equal whatever the inputs: every part's batch; a
    layer's key and value split at one token count (value scales have a row per token); and
    layers whose caches held one token count before (a symbol of the program: all layers, unless
    a pass such as `prompt-prune` shortened some) split alike."""
    same = []
    first_of: dict = {}
    for layer in layers:
        key, value = parts_of[layer.index, "key"], parts_of[layer.index, "value"]
        for parts in (key, value):
            same += [((parts[p], 0), (parts["codes"], 0)) for p in PARTS]
            same.append(((parts["zero"], 2), (parts["scale"], 2)))
        same += [((value["codes"], 2), (key["codes"], 2)), ((value["residual"], 2), (key["residual"], 2)),
                 ((value["scale"], 2), (key["codes"], 2))]
        val = layer.past_key.meta.get("val")
        first = first_of.setdefault(to_expr(val.shape[2]), layer.index) if val is not None else layer.index
        if first != layer.index:
            same += [((key[p], 2), (parts_of[first, "key"][p], 2)) for p in ("codes", "scale", "residual")]
    return same


def _traceable(inputs: dict[str, torch.Tensor], group: int) -> dict[str, torch.Tensor]:
    """Inputs to trace the decode program on: the examples, with a quantized part of at least two
    groups and a tail of at least two tokens (zero-padded, the mask grown to match), so that
    export keeps every cache size dynamic instead of fixing one whose example is 0 or 1 (an
    empty quantized part while the cache is shorter than `residual`), with sizes that are whole
    groups. Only shapes matter to the trace; the program keeps the real examples."""
    grown = dict(inputs)
    for name, x in inputs.items():
        if not name.startswith("past_"):
            continue
        # rows: tokens for codes and value scales, groups for key scales, tokens for the tail
        least = 2 if "_key_scale_" in name or "_key_zero_" in name or "_residual_" in name else 2 * group
        if x.shape[2] < least:
            pad = list(x.shape)
            pad[2] = least - x.shape[2]
            grown[name] = torch.cat([x.new_zeros(pad), x], dim=2)
    extra = sum(grown[n].shape[2] - inputs[n].shape[2] for n in ("past_key_0", "past_key_residual_0"))
    mask = inputs[MASK]
    grown[MASK] = torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1)
    return grown


def _size_of(node: fx.Node, dims: tuple[int, ...]) -> bool:
    return op_name(node) == "sym_size" and node.args[1] % 4 in dims


def _length_from_parts(graph: fx.Graph, past: fx.Node, parts: dict) -> None:
    """The past length the program reads off the cache (`past.shape[2]`, for positions and the
    causal mask) is now the quantized tokens plus the full-precision tail."""
    for user in list(past.users):
        if _size_of(user, (2,)):
            with graph.inserting_after(user):
                q = graph.call_function(torch.ops.aten.sym_size.int, (parts["codes"], 2))
            with graph.inserting_after(q):
                r = graph.call_function(torch.ops.aten.sym_size.int, (parts["residual"], 2))
            with graph.inserting_after(r):
                total = graph.call_function(operator.add, (q, r))
            user.replace_all_uses_with(total)
            graph.erase_node(user)


@register
class KVQuant(Pass):
    """KIVI KV-cache quantization: keys per channel, values per token, asymmetric, grouped; the newest tokens kept in full precision (lossy)."""

    name = NAME
    Config = KVQuantConfig
    lossless = False

    def exercise(self, config: KVQuantConfig) -> Exercise:
        """KIVI: a prompt of `residual + group` tokens quantizes one group at prefill, which decode
        then reads; the channel scheme quantizes every token."""
        if config.scheme == "channel":
            return Exercise(tokens=2, decode=1)
        return Exercise(tokens=config.residual + config.group, decode=1)

    def apply_model(self, model: Model, config: KVQuantConfig) -> ModelResult:
        scales = kv_quant_channel.calibrate(model, config.bits) if config.scheme == "channel" else None

        def rewrite(program: Program, inputs, dims):
            if scales is not None:
                new = kv_quant_channel.quantize_program(program, scales, config.bits, NAME, inputs, dims)
            elif inputs is None:
                new = _quantize_prefill(program, config)
            else:
                new = _quantize_decode(program, config, inputs, dims)
            # on each program's own examples: the decode program's continue the rewritten prefill's
            before = cache_bytes(program.run(program.example_inputs))
            after = cache_bytes(new.run(new.example_inputs))
            report = {"scheme": config.scheme, "bits": config.bits,
                      **({"group": config.group, "residual": config.residual} if scales is None else {}),
                      "layers": len(scales) if scales is not None else
                      sum(n.startswith("present_key_scale_") for n in new.output_names),
                      "kv_cache_bytes": {"before": before, "after": after,
                                         "ratio": round(after / before, 4) if before else None}}
            return new, report

        return rewrite_decoder(model, NAME, rewrite)
