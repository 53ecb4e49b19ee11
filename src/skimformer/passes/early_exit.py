"""early-exit: CALM-style confident exits (Schuster et al., NeurIPS 2022, arXiv 2207.07061). Lossy.

After each block in `at` the model's own head (final norm and LM head or classifier) is applied to
the residual stream; when the exit is confident the remaining blocks are skipped: a `torch.cond`
in the program, an ONNX `If` in the engine (`ir.exits`). Confidence of the last position's
distribution p (every row of the batch must pass: a batch leaves only when all its rows are
confident, the rule that keeps one control-flow path per step):

- `max-prob`: max p;  `margin`: p(top-1) - p(top-2);  `entropy`: 1 - H(p) / log(V).

A step leaves when its confidence is *above* `threshold`, so `threshold=1.0` never leaves and is
lossless. For decoders only the decode program gets exits (the prompt's cache stays exact); the
skipped layers' cache entries are their own key/value projections of the exit hidden state
(CALM's state propagation), so the cache keeps its shape and later tokens attend at every layer.
Every rewritten program returns `exit_layer` (0-d int64: blocks run), from which the report and
`skimformer generate --json` give the exit histogram and mean depth.

Ordering: apply after token and KV passes (they rewrite the blocks the exits cut); exits nest
under no other control flow.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx

from skimformer.errors import UserError
from skimformer.ir import Model, Program
from skimformer.ir.blocks import blocks_to_rewrite
from skimformer.ir.exit_heads import ExitHeads
from skimformer.ir.exits import ExitPoint, adapter_input, insert_exits
from skimformer.ir.graph import shape
from skimformer.ir.rewrite import eliminate_dead_code, reexport
from skimformer.ir.signature import named_outputs, set_outputs
from skimformer.ir.sizes import same_shape
from skimformer.passes.base import Exercise, ModelResult, Pass
from skimformer.passes.registry import register

NAME = "early-exit"
CRITERIA = ("max-prob", "margin", "entropy")
EXIT_LAYER = "exit_layer"


DEFAULT_AT, DEFAULT_THRESHOLD, DEFAULT_CRITERION = [8, 16], 0.9, "max-prob"


@dataclass
class EarlyExitConfig:
    """`at`, `threshold` and `criterion` default to those of `heads` (a `skimformer calibrate`
    file: its exits, per-exit thresholds and criterion), else to [8, 16], 0.9 and max-prob."""

    at: list[int] | None = None
    threshold: float | None = None
    criterion: str | None = None
    heads: str | None = None

    def __post_init__(self):
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}; got {self.criterion!r}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold is a confidence in [0, 1] (1.0 never exits); got {self.threshold}")
        if self.at is not None and not self.at:
            raise ValueError("at lists the blocks to exit after (0-based), e.g. at=[8, 16]")
        if self.at and (len(set(self.at)) != len(self.at) or any(a < 0 for a in self.at)):
            raise ValueError(f"at must list distinct block indices >= 0; got {self.at}")


@dataclass
class ExitPlan:
    """The exits to insert, resolved from the config and the calibrated heads."""

    at: list[int]
    thresholds: dict[int, float]
    criterion: str
    heads: ExitHeads | None

    @classmethod
    def of(cls, config: EarlyExitConfig) -> "ExitPlan":
        heads = ExitHeads.load(config.heads) if config.heads else None
        at = sorted(config.at or (heads.at if heads else DEFAULT_AT))
        if heads and set(at) - set(heads.at):
            raise UserError(f"{NAME}: {config.heads} has adapters for exits {heads.at}, not for "
                            f"{sorted(set(at) - set(heads.at))}: calibrate those exits or leave them out of at")
        criterion = config.criterion or (heads.criterion if heads else DEFAULT_CRITERION)
        calibrated = heads is not None and config.threshold is None and criterion == heads.criterion
        thresholds = {a: heads.thresholds[a] if calibrated else (
            DEFAULT_THRESHOLD if config.threshold is None else config.threshold) for a in at}
        return cls(at, thresholds, criterion, heads)


def confidence(logits: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per-row confidence `[B]` of the last position's distribution (see the module docstring)."""
    last = logits[:, -1] if logits.dim() == 3 else logits
    p = last.float().softmax(-1)
    if criterion == "max-prob":
        return p.amax(-1)
    if criterion == "margin":
        top = p.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    return 1 - entropy / math.log(p.shape[-1])


def confident(logits: torch.Tensor, criterion: str, threshold: float) -> torch.Tensor:
    """True (0-d) when every row is more confident than `threshold`: the batch leaves together."""
    return (confidence(logits, criterion) > threshold).all()


def _skipped(blocks: list, at: int, outputs: dict[str, fx.Node]) -> list[fx.Node]:
    """What an exit after block `at` reads as its hidden state: the last block's output, and the
    later blocks' inputs (CALM's state propagation into a decoder's cache). Where a token pass
    (tome, prune) left later blocks fewer tokens than the exit's hidden state has, only the head
    can be applied to it: the program's other outputs (a restored `last_hidden_state`) are
    rebuilt from merges made in the blocks the exit skips, so such a program is refused."""
    hidden = shape(blocks[at].output)
    later = [b.input for b in blocks[at + 1:]] + [blocks[-1].output]
    if all(same_shape(shape(node), hidden) for node in later):
        return later
    others = [name for name in outputs if name != "logits"]
    if others:
        raise UserError(f"{NAME}: a token pass changes the token count after block {at}, so an exit there gives only "
                        f"logits, but the program also returns {', '.join(others)}: export logits only, or drop the token pass")
    return [blocks[-1].output]


def add_exits(program: Program, plan: ExitPlan) -> Program:
    """`program` with conditional exits after the blocks in `plan.at` and an `exit_layer` output."""
    module = program.ep.module()
    graph = module.graph
    blocks = blocks_to_rewrite(graph, NAME, program.role,
                               f"use {NAME} without kv-quant (kv-window and kv-evict keep attention)")
    if any(a >= len(blocks) for a in plan.at):
        raise UserError(f"{NAME}: at={plan.at}, but the model has {len(blocks)} blocks: exits go after blocks "
                        f"0..{len(blocks) - 1}")
    if any(b.input is None or b.output is None for b in blocks):
        raise UserError(f"{NAME}: a block has no residual stream in and out, so there is no hidden state to exit with")
    outputs = named_outputs(module)
    if EXIT_LAYER in outputs:
        raise UserError(f"{NAME} was applied twice: give every exit in one at=[...]")
    if "logits" not in outputs:
        raise UserError(f"{NAME} needs the model's head: the program returns no `logits` "
                        f"(it returns {', '.join(outputs)}); export the model with its LM head or classifier")
    points = [ExitPoint(a + 1, blocks[a].output, _skipped(blocks, a, outputs),
                        adapter_input(module, f"exit_adapter_{a}", *plan.heads.adapters[a], blocks[a].output)
                        if plan.heads else None)
              for a in plan.at]
    by_depth = {a + 1: plan.thresholds[a] for a in plan.at}

    def decide(g: fx.Graph, exit_logits: fx.Node, layers_run: int) -> fx.Node:
        return g.call_function(confident, (exit_logits, plan.criterion, by_depth[layers_run]))

    names = list(outputs)
    new, ran = insert_exits(module, graph, points, outputs["logits"], list(outputs.values()), len(blocks), decide)
    set_outputs(module, {**dict(zip(names, new)), EXIT_LAYER: ran})
    eliminate_dead_code(graph)
    return reexport(program, module)


def exit_histogram(program: Program) -> dict:
    """Blocks run on the program's example inputs."""
    ran = int(program.run(program.example_inputs)[EXIT_LAYER])
    return {"histogram": dict(Counter([ran])), "mean_depth": float(ran)}


@register
class EarlyExit(Pass):
    """CALM: leave after block k when the head is confident (torch.cond / ONNX If; lossy)."""

    name = NAME
    Config = EarlyExitConfig
    lossless = False

    def exercise(self, config: EarlyExitConfig) -> Exercise:
        """A measured step must leave at an exit (run `a + 1` blocks): one that never does computes the original."""
        plan = ExitPlan.of(config)
        if all(t >= 1 for t in plan.thresholds.values()):
            return Exercise(never="a threshold of 1.0 never leaves")
        return Exercise(decode=1, exits=tuple(a + 1 for a in plan.at))

    def apply_model(self, model: Model, config: EarlyExitConfig) -> ModelResult:
        role = "decode" if model.is_decoder else "model"
        if role not in model.programs:
            raise UserError(f"{NAME} rewrites an encoder's `model` program or a decoder's `decode` program; "
                            f"this model has {', '.join(model.programs)}")
        plan = ExitPlan.of(config)
        if plan.heads and plan.heads.kind != model.kind:
            raise UserError(f"{NAME}: {config.heads} was calibrated on an {plan.heads.kind}, and this model is an "
                            f"{model.kind}: calibrate this model")
        program = add_exits(model.programs[role], plan)
        report = {"program": role, "at": plan.at, "criterion": plan.criterion,
                  "thresholds": {str(a): t for a, t in plan.thresholds.items()},
                  "adapters": bool(plan.heads),
                  "batch_rule": "a batch leaves an exit only when every row is confident",
                  "skipped_cache": "skipped layers' keys and values are projected from the exit hidden state",
                  "example_inputs": exit_histogram(program)}
        return ModelResult(model.replace({**model.programs, role: program}), report, len(plan.at))
