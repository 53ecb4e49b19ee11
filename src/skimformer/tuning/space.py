"""The search space: which passes apply to this model, and the fields a trial varies.

Groups (`--space`), each a choice of at most one method per trial, in pipeline order:
- `skip`: `skip-layers` or `skip-ffn` on a run of `count` blocks from `start` (never block 0);
  deep models carry redundant middle and late blocks (ShortGPT), rarely the first.
- `tokens`: encoders `tome` (`r` up to what the sequence holds through every block, `schedule`)
  or `prune` (`keep`, `at` among early, middle and spread layer sets, `score`); decoders
  `prompt-prune` (`layer`, `keep`).
- `exit`: `early-exit` with the adapters `calibrate` trained for this model, at their calibrated
  thresholds or a uniform one.
- `kv` (decoders with a cache): `kv-window` (`window`), `kv-evict` (`policy`, `keep`) or
  `kv-quant` (`scheme`, `bits`); sized to the measured prompt, so that each acts on it.
- `weights` (ONNX Runtime): the backend's `--weights int8|int4`.

Pipeline order follows the passes' own constraints: kv-window and kv-evict rewrite every layer's
attention over its cache and refuse a cache that a block rewrite left unread, so they come first;
then token passes and exits, whose layer indices (and calibrated adapters) count the model's own
blocks, which skip passes would renumber; kv-quant's quantized attention is no block the others
know, so it comes last. Two pairs do not compose, and a trial that picks both runs the first
alone: tome and skip-ffn (tome merges where skip-ffn cuts, between attention and MLP), and exits
and skip passes (an exit puts the later blocks inside a conditional, where skip passes find no
block; skipping first would renumber the blocks the exit adapters were calibrated for). Other
combinations a pass refuses fail at the screen, and are told to Optuna as infeasible.

The search starts from each method alone at a middle setting (`starts`): with tens of trials, a
random start would mostly combine several lossy passes and fall outside the budget, while single
passes tell the sampler early which methods this model tolerates. A group that cannot apply (KV compression on an
encoder, exits on a model without a head) is left out of the default space and refused when
asked for. Spaces are define-by-run (Optuna asks for a method's fields only when it is chosen);
ranges are fixed per model, so a field's distribution is the same in every trial.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from skimformer.errors import UserError
from skimformer.ir import Model, Program, analyze
from skimformer.passes.token_report import tokens_per_block
from skimformer.tuning.rows import Rows

GROUPS = ("tokens", "kv", "exit", "skip", "weights")
EXIT_THRESHOLDS = ("calibrated", 0.6, 0.8, 0.9, 0.95, 0.99)
HEADS = ("lm_head", "classifier")


@dataclass(frozen=True)
class Candidate:
    """One configuration: a pipeline (pass grammar) and the backend's weight format."""

    pipeline: str
    weights: str | None = None

    @property
    def key(self) -> str:
        return f"{self.pipeline} | weights={self.weights}"

    @property
    def label(self) -> str:
        return "; ".join(p for p in (self.pipeline, self.weights and f"--weights {self.weights}") if p) or "unoptimized"


@dataclass(frozen=True)
class Facts:
    """What decides the space: encoder or decoder, blocks, tokens at the first block (a decoder's
    measured prompt), a KV cache, a head an exit can use, a backend with weight formats."""

    decoder: bool
    blocks: int
    tokens: int
    cache: bool
    head: bool
    weights: bool

    @classmethod
    def of(cls, model: Model, rows: Rows, backend: str) -> "Facts":
        program = model.programs["decode" if model.is_decoder else next(iter(model.programs))]
        structure = analyze(program)
        if model.is_decoder:
            tokens = rows.prompt
        else:
            inputs = {k: torch.as_tensor(v) for k, v in rows.timing_inputs().items()}
            tokens = (tokens_per_block(Program(ep=program.ep, role=program.role, example_inputs=inputs)) or [0])[0] or 0
        return cls(model.is_decoder, len(structure.blocks), tokens, bool(structure.kv_cache.inputs),
                   any(h.name in HEADS for h in structure.heads), backend == "onnxruntime")

    def why_not(self, group: str) -> str | None:
        """Why `group` cannot apply to this model, or None when it can."""
        if self.blocks == 0:
            return "no transformer blocks were found"
        return {"kv": None if self.decoder and self.cache else "it needs a decoder with a KV cache",
                "exit": None if self.head else "it needs a model head (an LM head or a classifier) to exit through",
                "skip": None if self.blocks >= 2 else "the model has one block",
                "tokens": None if self.decoder or self.tokens >= 4 else f"the inputs hold {self.tokens} tokens",
                "weights": None if self.weights else "only the onnxruntime backend has weight formats"}[group]


def space_groups(facts: Facts, asked: str | None) -> list[str]:
    """The groups to search: those `asked` (`tokens,kv`), or by default every one that applies."""
    if asked is None:
        return [g for g in GROUPS if facts.why_not(g) is None]
    groups = [g.strip() for g in asked.split(",") if g.strip()]
    for g in groups:
        if g not in GROUPS:
            raise UserError(f"unknown --space group {g!r}: use a comma-separated list of {', '.join(GROUPS)}")
        if facts.why_not(g):
            usable = ", ".join(x for x in GROUPS if facts.why_not(x) is None) or "none"
            raise UserError(f"--space {g} does not apply to this model: {facts.why_not(g)} (groups that apply: {usable})")
    if not groups:
        raise UserError(f"--space is empty: give a comma-separated list of {', '.join(GROUPS)}")
    return [g for g in GROUPS if g in groups]


def _at_options(blocks: int) -> list[str]:
    """Layer sets to prune after: early, a quarter, half way, and spread pairs and triples; never
    after the last block (nothing would run on fewer tokens)."""
    last = blocks - 2
    sets = [[0], [blocks // 4], [blocks // 2], [blocks // 6, blocks // 2], [blocks // 4, blocks // 2, 3 * blocks // 4]]
    out = []
    for s in sets:
        s = sorted({min(a, last) for a in s})
        text = "[" + ", ".join(map(str, s)) + "]"
        if text not in out:
            out.append(text)
    return out


class Space:
    def __init__(self, facts: Facts, groups: list[str], heads: str | None = None):
        self.facts, self.groups, self.heads = facts, groups, heads
        if "exit" in groups and heads is None:
            raise ValueError("the exit group needs calibrated exit heads")

    def suggest(self, trial) -> Candidate:
        """A candidate from an Optuna trial (its `suggest_*` calls decide the fields)."""
        kv = self._kv(trial)
        first, last = ("", kv) if kv.startswith("kv-quant") else (kv, "")
        tokens, exits, skip = self._tokens(trial), self._exit(trial), self._skip(trial)
        if exits or (tokens.startswith("tome") and skip.startswith("skip-ffn")):
            skip = ""
        parts = [p for p in (first, tokens, exits, skip, last) if p]
        weights = trial.suggest_categorical("weights", ["none", "int8", "int4"]) if "weights" in self.groups else "none"
        return Candidate("; ".join(parts), None if weights == "none" else weights)

    def _skip(self, trial) -> str:
        if "skip" not in self.groups:
            return ""
        method = trial.suggest_categorical("skip", ["none", "skip-layers", "skip-ffn"])
        if method == "none":
            return ""
        blocks = self.facts.blocks
        count = trial.suggest_int("skip.count", 1, max(1, blocks // 3))
        start = trial.suggest_int("skip.start", 1, blocks - 1)
        layers = list(range(start, min(start + count, blocks)))
        return f"{method}(layers=[{', '.join(map(str, layers))}])"

    def _tokens(self, trial) -> str:
        if "tokens" not in self.groups:
            return ""
        f = self.facts
        if f.decoder:
            if trial.suggest_categorical("tokens", ["none", "prompt-prune"]) == "none":
                return ""
            layer = trial.suggest_int("prompt-prune.layer", 1 if f.blocks >= 3 else 0, max(0, f.blocks - 2))
            keep = trial.suggest_float("prompt-prune.keep", 0.2, 0.9, step=0.05)
            return f"prompt-prune(layer={layer}, keep={keep:.2f})"
        method = trial.suggest_categorical("tokens", ["none", "tome", "prune"])
        if method == "tome":
            r = trial.suggest_int("tome.r", 1, max(1, (f.tokens - 2) // (f.blocks + 1)))
            schedule = trial.suggest_categorical("tome.schedule", ["constant", "decreasing"])
            return f"tome(r={r}, schedule={schedule})"
        if method == "prune":
            keep = trial.suggest_float("prune.keep", 0.3, 0.9, step=0.05)
            at = trial.suggest_categorical("prune.at", _at_options(f.blocks))
            score = trial.suggest_categorical("prune.score", ["cls", "mean-attention", "key-norm"])
            return f"prune(keep={keep:.2f}, at={at}, score={score})"
        return ""

    def _exit(self, trial) -> str:
        if "exit" not in self.groups:
            return ""
        threshold = trial.suggest_categorical("exit.threshold", ["none", *EXIT_THRESHOLDS])
        if threshold == "none":
            return ""
        return f"early-exit(heads='{self.heads}'{'' if threshold == 'calibrated' else f', threshold={threshold}'})"

    def _kv(self, trial) -> str:
        if "kv" not in self.groups:
            return ""
        method = trial.suggest_categorical("kv", ["none", "kv-window", "kv-evict", "kv-quant"])
        prompt = self.facts.tokens
        if method == "kv-window":
            window = trial.suggest_int("kv-window.window", max(8, prompt // 16), max(9, prompt - 8), log=True)
            return f"kv-window(sink=4, window={window})"
        if method == "kv-evict":
            policy = trial.suggest_categorical("kv-evict.policy", ["snapkv", "knorm", "h2o"])
            keep = trial.suggest_float("kv-evict.keep", 0.2, 0.9, step=0.05)
            return f"kv-evict(policy={policy}, keep={keep:.2f}, window={min(32, max(1, prompt // 8))})"
        if method == "kv-quant":
            scheme = trial.suggest_categorical("kv-quant.scheme", ["channel", "kivi"])
            bits = trial.suggest_categorical("kv-quant.bits", [8, 4])
            return f"kv-quant(scheme={scheme}, bits={bits})"
        return ""

    def starts(self) -> list[dict]:
        """Trial parameters of each method alone at a middle setting, every other group at none."""
        f = self.facts
        none = {"exit.threshold" if g == "exit" else g: "none" for g in self.groups}
        single = {
            "skip": [{"skip": m, "skip.count": 1, "skip.start": max(1, f.blocks // 2)} for m in ("skip-layers", "skip-ffn")],
            "tokens": ([{"tokens": "prompt-prune", "prompt-prune.layer": max(0, min(f.blocks - 2, f.blocks // 4)),
                         "prompt-prune.keep": 0.5}] if f.decoder else
                       [{"tokens": "tome", "tome.r": max(1, (f.tokens - 2) // (f.blocks + 1) // 4), "tome.schedule": "constant"},
                        {"tokens": "prune", "prune.keep": 0.7, "prune.at": _at_options(f.blocks)[-1], "prune.score": "cls"}]),
            "exit": [{"exit.threshold": "calibrated"}],
            "kv": [{"kv": "kv-window", "kv-window.window": max(8, f.tokens // 2)},
                   {"kv": "kv-evict", "kv-evict.policy": "snapkv", "kv-evict.keep": 0.5},
                   {"kv": "kv-quant", "kv-quant.scheme": "channel", "kv-quant.bits": 8}],
            "weights": [{"weights": "int8"}]}
        return [{**none, **params} for g in self.groups for params in single[g]]

    def describe(self) -> dict[str, str]:
        """The groups searched and what each varies, for the summary."""
        f = self.facts
        text = {"skip": f"skip-layers | skip-ffn: count 1..{max(1, f.blocks // 3)}, start 1..{f.blocks - 1}",
                "tokens": ("prompt-prune: layer, keep 0.2..0.9" if f.decoder else
                           f"tome: r 1..{max(1, (f.tokens - 2) // (f.blocks + 1))}, schedule | "
                           f"prune: keep 0.3..0.9, at {' '.join(_at_options(f.blocks))}, score"),
                "exit": f"early-exit (heads {self.heads}): threshold {', '.join(map(str, EXIT_THRESHOLDS))}",
                "kv": "kv-window: window | kv-evict: policy, keep | kv-quant: scheme, bits",
                "weights": "--weights none | int8 | int4"}
        return {g: text[g] for g in self.groups}
