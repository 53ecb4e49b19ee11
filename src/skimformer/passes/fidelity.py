"""Fidelity of a lossy pipeline, measured on inputs where its passes act.

Measured on inputs it does not act on, a lossy pass scores perfectly and says nothing: kv-quant
on a 16-token example prompt, all inside its 128-token full-precision tail, quantizes nothing. So
each matched lossy pass says what exercises it (`Pass.exercise`: prompt tokens, decode steps,
an exit taken), the inputs are sized to the largest need within a cap that keeps the measurement
cheap on a CPU, and a pass the measurement does not reach is reported as "not exercised" with the
reason, never as a score. Figures are given only when some pass was exercised.

Decoders: `ROWS` passages of the shipped texts cut with the folder's tokenizer (random ids when
it has none; or the rows of `--data`). Both the original and the rewritten programs prefill the
prompt, then are fed the text's next tokens one decode step each (teacher forcing, as
benchmarks/kv.py does), threading their own caches; the logits that predict each fed token (the
prefill's last position, then each step's) are compared: next-token agreement (same argmax),
cosine and KL(original || rewritten) in nats, averaged over positions; and the prefill's logits
over every prompt position (`prefill.logits.*`). Encoders: the example inputs (or `--data`)
through both programs, output by output (cosine; top-1 agreement of logits).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

from skimformer.backends.generation import EXIT_LAYER, Prompt
from skimformer.backends.teacher_forcing import Decoder, Run, forced_logits, program_runner
from skimformer.calibration.data import as_inputs, model_tokenizer, text_rows
from skimformer.errors import UserError, VerificationError
from skimformer.ir import Model, Program
from skimformer.passes.base import Exercise
from skimformer.passes.token_report import tokens_per_block

MIN_PROMPT = 64  # decoders: prompt tokens measured at least, whatever the passes need
MAX_PROMPT = 2048  # and at most (a prefill of 2 x 2048 tokens of SmolLM2-135M takes seconds on 2 cores)
DECODE_STEPS = 16  # teacher-forced decode steps at least
MAX_DECODE = 128
ROWS = 2
RUN_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError)


@dataclass
class Measured:
    """What the measurement ran: tokens (a decoder's prompt, an encoder's sequence at the first
    block; None when unknown), decode steps (None for an encoder), `limit`: why the inputs are no
    longer, blocks run by each call of a program with exits, and why it could not run at all."""

    tokens: int | None
    decode: int | None
    limit: str
    exit_layers: tuple[int, ...] = ()
    failed: str = ""

    def missed(self, need: Exercise) -> str | None:
        """Why these inputs do not exercise a pass that needs `need`, or None when they do."""
        if need.never or self.failed:
            return need.never or self.failed
        if self.tokens is not None and self.tokens < need.tokens:
            what = "prompt" if self.decode is not None else "sequence"
            return f"it acts on a {what} of at least {need.tokens} tokens, and {self.limit}"
        if self.decode is not None and self.decode < need.decode:
            return f"it acts in decode steps (at least {need.decode}), and {self.limit}"
        if need.exits and not set(need.exits) & set(self.exit_layers):
            return f"no measured step left at an exit (blocks run: {sorted(set(self.exit_layers))})"
        return None

    def may_exercise(self, needs: list[Exercise]) -> bool:
        """Whether inputs of this size can exercise any of the passes (exits are seen only by running)."""
        return any(self.missed(replace(n, exits=())) is None for n in needs)


def measure_fidelity(original: Model, rewritten: Model, lossy: list[tuple[str, Exercise]],
                     data: dict[str, np.ndarray] | None = None,
                     progress: Callable[[str], None] = lambda m: None) -> dict:
    """report.json's `fidelity` for the matched lossy passes `lossy` (name, what exercises it):
    metric -> value, `measured_on` and, per pass, "exercised" or "not exercised: why"."""
    measure = _decoder if rewritten.is_decoder else _encoder
    metrics, measured, on = measure(original, rewritten, [need for _, need in lossy], data, progress)
    status = {}
    for i, (name, need) in enumerate(lossy):
        key = name if [n for n, _ in lossy].count(name) == 1 else f"{name}#{i}"
        why = measured.missed(need)
        status[key] = "exercised" if why is None else f"not exercised: {why}"
    if all(s != "exercised" for s in status.values()):
        metrics = {}
    return {**metrics, **({"measured_on": on} if on else {}), "exercised": status}


# -- decoders ------------------------------------------------------------------------------------

@dataclass
class Rows:
    """A decoder's fidelity rows: `ids` `[B, prompt + decode + 1]` (the prompt, then the tokens fed
    one decode step each; the last one is only predicted), their `mask` (None: no padding), where
    they come from, and why the prompt is no longer (`limit`)."""

    ids: np.ndarray
    mask: np.ndarray | None
    source: str
    prompt: int
    decode: int
    limit: str


def _decoder(original: Model, rewritten: Model, needs: list[Exercise], data, progress):
    r = _rows(original, needs, data)
    measured = Measured(r.prompt, r.decode, r.limit)
    if not measured.may_exercise(needs):
        return {}, measured, None
    on = {"inputs": r.source, "rows": int(r.ids.shape[0]), "prompt_tokens": r.prompt, "decode_steps": r.decode}
    first = Prompt.of(r.ids[:, :r.prompt], None if r.mask is None else r.mask[:, :r.prompt], 1)
    forced = r.ids[:, r.prompt:r.prompt + r.decode + 1]
    progress(f"fidelity: {len(r.ids)} rows of {r.prompt} prompt tokens and {r.decode} teacher-forced decode steps")
    try:
        ref_prefill, ref_steps, _ = _forced(original, first, forced)
    except RUN_ERRORS as e:
        failed = f"the original programs do not run on {r.prompt}-token prompts: {_first_line(e)}"
        return {}, Measured(r.prompt, r.decode, r.limit, failed=failed), None
    try:
        got_prefill, got_steps, exits = _forced(rewritten, first, forced)
    except RUN_ERRORS as e:
        raise VerificationError(f"the rewritten programs fail on {r.prompt}-token prompts and {r.decode} decode "
                                f"steps, which the original runs: {_first_line(e)}") from e
    metrics = next_token_metrics(ref_steps, got_steps)
    prefill = compare_outputs({"logits": torch.from_numpy(ref_prefill)}, {"logits": torch.from_numpy(got_prefill)})
    metrics.update({f"prefill.{k}": v for k, v in prefill.items()})
    return metrics, Measured(r.prompt, r.decode, r.limit, exits), on


def _rows(model: Model, needs: list[Exercise], data) -> Rows:
    """Rows as long as the passes need: texts (or random ids) up to the cap, or `data`."""
    rows, static = _static_prompt(model)
    ids, mask, source = _data_rows(model, data) if data is not None else (None, None, "")
    if static is not None:  # no decode step fits a static cache: the prefill alone
        if ids is None:
            ids, source = _text_rows(model, static, rows or ROWS)
        return Rows(ids, mask, source, ids.shape[1], 0, f"the programs' shapes are static ({static}-token prompts)")
    if ids is not None:  # the passes' prompt first, then as many decode steps as fit (at least one)
        n = ids.shape[1]
        prompt = max(n - 1 - _decode_steps(needs), min(n - 2, max(x.tokens for x in needs)))
        limit = f"the {n}-token rows of --data leave {prompt} prompt tokens"
        return Rows(ids, mask, source, prompt, n - 1 - prompt, limit)
    limit, cap = _prompt_cap(model)
    decode = _decode_steps(needs)
    room = cap - decode - 1
    prompt = min(room, max([MIN_PROMPT, *(n.tokens for n in needs if not n.never and n.tokens <= room)]))
    ids, source = _text_rows(model, prompt + decode + 1, ROWS)
    return Rows(ids, None, source, prompt, decode, limit)


def _static_prompt(model: Model) -> tuple[int | None, int | None]:
    """The prefill's static batch and prompt length (None where dynamic)."""
    spec = next(s for s in model.programs["prefill"].input_specs() if s["name"] == "input_ids")
    return tuple(s if isinstance(s, int) else None for s in spec["shape"][:2])


def _decode_steps(needs: list[Exercise]) -> int:
    return min(MAX_DECODE, max([DECODE_STEPS, *(n.decode for n in needs)]))


def _prompt_cap(model: Model) -> tuple[str, int]:
    """Why and where the measured sequence stops: MAX_PROMPT, or the model's positions."""
    positions = _max_positions(model)
    if positions is not None and positions < MAX_PROMPT:
        return f"the model takes {positions} positions", positions
    return f"fidelity prompts are capped at {MAX_PROMPT} tokens", MAX_PROMPT


def _max_positions(model: Model) -> int | None:
    config = next((p for p in model.extra_files if p.name == "config.json"), None)
    if config is None:
        return None
    values = json.loads(config.read_text())
    return next((values[k] for k in ("max_position_embeddings", "n_positions") if isinstance(values.get(k), int)),
                None)


def _text_rows(model: Model, length: int, rows: int) -> tuple[np.ndarray, str]:
    """`[rows, length]` ids: passages of the shipped texts cut with the folder's tokenizer, else random ids."""
    tokenizer = model_tokenizer(model)
    if tokenizer is None:
        why = "the model folder has no tokenizer"
    else:
        from skimformer.zoo.texts import MissingData  # the zoo imports transformers: only when it is needed

        try:
            return text_rows(model, rows, length, tokenizer)["input_ids"], "passages of the shipped texts"
        except (MissingData, ValueError) as e:
            why = _first_line(e)
    vocab = next(s["shape"][-1] for s in model.programs["prefill"].output_specs() if s["name"] == "logits")
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    return ids.numpy(), f"random token ids ({why})"


def _data_rows(model: Model, data: dict) -> tuple[np.ndarray, np.ndarray, str]:
    inputs = as_inputs(data, model.programs["prefill"], True, what="fidelity inputs (--data)", min_rows=1)
    ids, mask = inputs["input_ids"].numpy(), inputs["attention_mask"].numpy()
    if ids.shape[1] < 3:
        raise UserError("--data rows for a decoder need at least 3 tokens: a prompt, then teacher-forced "
                        f"decode steps; got {ids.shape[1]}")
    return ids, mask, "the rows of --data"


def _forced(model: Model, prompt: Prompt, forced: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    """The prefill's logits, the logits predicting each `forced` token `[B, n, V]`, and the blocks
    run by each program call that reports them (early exits)."""
    exits: list[int] = []
    run = _recording(program_runner(model), exits)
    outputs = prompt.prefill(run)
    decoder = Decoder(run, prompt, outputs)
    steps = np.concatenate(list(forced_logits(decoder, forced)), axis=1)
    return outputs["logits"], steps, tuple(exits)


def _recording(run: Run, exits: list[int]) -> Run:
    def recorded(feeds: dict, role: str) -> dict:
        out = run(feeds, role)
        if EXIT_LAYER in out:
            exits.append(int(out[EXIT_LAYER]))
        return out

    return recorded


def next_token_metrics(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Per predicted position of `[B, n, V]` logits, averaged: same argmax, cosine, KL(reference || candidate)."""
    ref, got = torch.from_numpy(reference).double(), torch.from_numpy(candidate).double()
    log_ref, log_got = ref.log_softmax(-1), got.log_softmax(-1)
    return {"next_token_agreement": float((ref.argmax(-1) == got.argmax(-1)).double().mean()),
            "next_token_cosine": float(torch.nn.functional.cosine_similarity(ref, got, dim=-1).mean()),
            "next_token_kl": float((log_ref.exp() * (log_ref - log_got)).sum(-1).mean())}


# -- encoders ------------------------------------------------------------------------------------

def _encoder(original: Model, rewritten: Model, needs: list[Exercise], data, progress):
    (role, program), = original.programs.items()
    if data is not None:
        inputs = as_inputs(data, program, False, what="fidelity inputs (--data)", min_rows=1)
        source = "the rows of --data"
    else:
        inputs, source = program.example_inputs, "the example inputs"
    tokens = tokens_per_block(Program(ep=program.ep, role=role, example_inputs=inputs))
    first = tokens[0] if tokens else None
    measured = Measured(first, None, f"{source} hold {first} tokens")
    if not measured.may_exercise(needs):
        return {}, measured, None
    on = {"inputs": source, "rows": int(next(iter(inputs.values())).shape[0]), "tokens": first}
    progress(f"fidelity: {source}")
    want, got = program.run(inputs), rewritten.programs[role].run(inputs)
    exits = (int(got[EXIT_LAYER]),) if EXIT_LAYER in got else ()
    return compare_outputs(want, got), Measured(first, None, measured.limit, exits), on


def compare_outputs(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-output agreement of a lossy rewrite: cosine similarity, and top-1 agreement for
    outputs whose last axis is a distribution (logits)."""
    metrics = {}
    for name, ref in reference.items():
        got = candidate.get(name)
        if got is None or not ref.is_floating_point() or got.shape != ref.shape or ref.numel() == 0:
            continue
        metrics[f"{name}.cosine"] = _cosine(ref, got)
        if name.endswith("logits") and ref.dim() >= 2:
            metrics[f"{name}.top1_agreement"] = float((ref.argmax(-1) == got.argmax(-1)).double().mean())
    return metrics


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two flattened tensors in float64, a slice at a time (a prefill's logits are large)."""
    dot = na = nb = 0.0
    for x, y in zip(a.flatten().split(1 << 22), b.flatten().split(1 << 22)):
        x, y = x.double(), y.double()
        dot, na, nb = dot + float(x @ y), na + float(x @ x), nb + float(y @ y)
    return dot / max(math.sqrt(na * nb), 1e-8)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
