"""Early exit and self-speculation: fidelity against depth and speed, side by side in one run.

Everything is timed on ONNX Runtime CPU (2 threads, the same for every engine), medians.

- `speculate` (SmolLM2-135M-Instruct, real weights): exit adapters are calibrated on the shipped
  texts (`skimformer calibrate`, backbone frozen) for the exits in `EXITS`. The full model then
  generates greedy continuations of held-out prompts. Because self-speculation keeps exactly the
  greedy tokens, each draft's fate is decided by one fact per position: does the draft head (the
  first `exit` layers plus the model's head, with or without the adapter) predict the full model's
  next token there? That is read off one teacher-forced pass, for every exit at once, and the
  rounds of drafting are replayed from it: acceptance per (exit, draft length), and an estimated
  speed-up from a cost model (a draft token costs its layers plus the head; a verification the
  remaining layers plus the head, and `VERIFY_EXTRA` of that again per extra position), which
  picks the exit and draft length. For the exit picked, engines with and without the adapter are
  built and measured for real: tokens/s against the same engine's plain decoding, acceptance, and a
  check that the tokens equal greedy decoding.
- `early` (SmolLM2): `early-exit(heads=...)` after blocks `EARLY_AT` with the same calibrated
  adapters, at their calibrated thresholds (target agreement 0.99) and at a fixed lower one: next-token agreement with the full model (teacher-forced, one decode
  step a token, as the engine generates), perplexity of the same tokens, mean exit depth and
  decode tokens/s against the full decode.
- `digits` (the digits ViT that `benchmarks/tokens.py` trains, real labels): exits after each of
  its first three blocks, calibrated on half of the held-out images (the model fits its training
  images perfectly, so thresholds chosen there trust it too much) at several target agreements:
  top-1 on the other half against mean exit depth and throughput (batch 1: each image leaves on
  its own).

Targets: self-speculate output identical to greedy decoding, always; its speed-up aims at 1.3x
on SmolLM2 with calibrated adapters; digits exits >= 1.5x at <= 1 point of top-1 lost.
`--quick` is a smoke test (fewer prompts, tokens and settings). Exports, heads and engines are
cached under .cache/bench-kv (shared with the KV benchmark: the same SmolLM2 export).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, Sections, interleaved_ms, setup_threads  # noqa: E402
import tokens as T  # noqa: E402  (cached exports and engine builds)

import transformers  # noqa: E402

from skimformer.backends.generation import generate  # noqa: E402
from skimformer.backends.speculation import speculate  # noqa: E402
from skimformer.calibration import calibrate_model  # noqa: E402
from skimformer.calibration.backbone import Backbone  # noqa: E402
from skimformer.ir import load  # noqa: E402
from skimformer.ir.exit_heads import ExitHeads, adapt  # noqa: E402
from skimformer.zoo import digits, real, texts  # noqa: E402
from skimformer.zoo.hf_export import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T.CACHE = Path(os.environ.get("SKIMFORMER_BENCH_EXIT_CACHE") or ROOT / ".cache" / "bench-kv")
progress = T.progress
EXITS = [3, 7, 11, 14, 22]  # SmolLM2 blocks to exit after (0-based; 30 blocks), calibrated once for both sections
EARLY_AT = [7, 14, 22]
DRAFTS = [1, 2, 3, 4, 6]
VERIFY_EXTRA = 0.25  # cost of each extra verified position, as a fraction of a one-position pass
SPEED_TARGET = 1.3
QUICK = False
REUSE = False


def build(export: Path, source: Path, spec: str) -> T.Built:
    """The engine of `spec`, or with --reuse-engines the newest cached one whatever its sources."""
    return (REUSE and T.newest_cached(export, spec)) or T.build(export, source, spec)


def _smollm2() -> tuple[Path, transformers.PreTrainedTokenizerBase]:
    params = dict(batch=2, seq_len=32)
    export = T.cached_export("smollm2", params, lambda out: real.export_smollm2(out, **params))
    return export, transformers.AutoTokenizer.from_pretrained(export, local_files_only=True)


def _heads(export: Path, at: list[int], steps: int = 200) -> Path:
    """Calibrated SmolLM2 exit adapters for `at`, cached."""
    path = T.CACHE / "heads" / f"smollm2--{T._digest(export.name, at, steps, T.SOURCES)}.safetensors"
    if REUSE and not path.is_file():  # the newest adapters for these exits, whatever sources made them
        cached = sorted((T.CACHE / "heads").glob("smollm2--*.safetensors"), key=lambda p: p.stat().st_mtime)
        path = next((p for p in reversed(cached) if ExitHeads.load(p).at == at), path)
    if not path.is_file():
        progress(f"calibrating SmolLM2 exits after blocks {at} ({steps} steps)")
        result = calibrate_model(load(export), at=at, out=path, steps=steps, progress=lambda m: progress(f"  {m}"))
        progress(result.table())
    return path


def _prompts(tokenizer, count: int, length: int, first: int = 100) -> np.ndarray:
    """Prompts from passages the calibration did not read (it takes the first passages)."""
    return np.array([tokenizer(texts.passage(length, first + i, tokenizer))["input_ids"][:length]
                     for i in range(count)], dtype=np.int64)


def _draft_hits(export: Path, heads: ExitHeads, sequences: np.ndarray, prompt: int) -> dict[tuple[int, bool], np.ndarray]:
    """Per (exit, adapted): whether the draft head predicts the full model's greedy next token at
    each generated position, `[rows, new - 1]`, from one teacher-forced prefill pass."""
    backbone = Backbone(load(export).programs["prefill"])
    ids = torch.from_numpy(sequences)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "position_ids": torch.arange(ids.shape[1]).expand_as(ids).contiguous()}
    captured = backbone.run(batch, heads.at)
    shape = ids.shape
    full = captured.log_probs.argmax(-1).view(shape)[:, prompt - 1:-1]  # the greedy tokens themselves
    hits = {}
    for k in heads.at:
        for adapted in (False, True):
            hidden = adapt(captured.hidden[k], *heads.adapters[k]) if adapted else captured.hidden[k]
            with torch.no_grad():
                draft = backbone.head(hidden, captured).argmax(-1).view(shape)[:, prompt - 1:-1]
            hits[(k, adapted)] = (draft == full).numpy()
    return hits


def _replay(hits: np.ndarray, draft: int) -> tuple[float, float]:
    """Acceptance and tokens per round of speculation along greedy trajectories whose per-position
    draft hits are `hits` (batch 1 per row)."""
    kept = drafted = rounds = tokens = 0
    for row in hits:
        i = 0
        while i < len(row):
            n = 0
            while n < draft and i + n < len(row) and row[i + n]:
                n += 1
            kept, drafted, rounds, tokens, i = kept + n, drafted + draft, rounds + 1, tokens + n + 1, i + n + 1
    return kept / drafted, tokens / rounds


def _speedup(exit_layers: int, layers: int, head: float, draft: int, per_round: float) -> float:
    """Estimated speed-up of speculation over plain decoding (cost model of the module docstring),
    in units of one layer's weights; `head` is the LM head's size in those units."""
    drafting = (draft + 1) * (exit_layers + head)
    verifying = (layers - exit_layers + head) * (1 + VERIFY_EXTRA * draft)
    return per_round * (layers + head) / (drafting + verifying)


def _tokens_per_s(fn, repeats: int = 2) -> tuple[float, object]:
    best, result = 0.0, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = max(best, result.ids.size / (time.perf_counter() - start))
    return best, result


def speculate_section() -> list[tuple]:
    export, tokenizer = _smollm2()
    heads = ExitHeads.load(_heads(export, EXITS))
    prompts, new = (2, 32) if QUICK else (6, 64)
    prompt = 96
    base = build(export, export, "")
    ids = _prompts(tokenizer, prompts, prompt)
    progress(f"greedy reference: {prompts} prompts x {new} tokens")
    reference = np.concatenate([base.engine.generate(row[None], new) for row in ids])
    hits = _draft_hits(export, heads, np.concatenate([ids, reference], 1), prompt)
    config = transformers.AutoConfig.from_pretrained(export, local_files_only=True)
    layers = config.num_hidden_layers
    layer_params = 4 * config.hidden_size ** 2 * (1 + config.num_key_value_heads / config.num_attention_heads) / 2 \
        + 3 * config.hidden_size * config.intermediate_size
    head = config.vocab_size * config.hidden_size / layer_params
    rows, best = [], None
    for (k, adapted), hit in sorted(hits.items()):
        for draft in DRAFTS:
            acceptance, per_round = _replay(hit, draft)
            estimate = _speedup(k + 1, layers, head, draft, per_round)
            rows.append({"exit": k + 1, "adapter": "yes" if adapted else "no", "draft": draft,
                         "next-token hit": f"{hit.mean():.2f}", "acceptance": f"{acceptance:.2f}",
                         "tokens/round": f"{per_round:.2f}", "estimated speed-up": f"{estimate:.2f}x"})
            if adapted and (best is None or estimate > best[0]):
                best = (estimate, k, draft)
    note = (f"{prompts} held-out prompts of {prompt} tokens, {new} greedy tokens each; exit = layers that draft; "
            f"cost model: head = {head:.1f} layers of weights, each extra verified position {VERIFY_EXTRA} of a pass")
    tables = [("self-speculation, replayed from teacher-forced draft hits (SmolLM2, every exit at once)", note, rows,
               ["exit", "adapter", "draft", "next-token hit", "acceptance", "tokens/round", "estimated speed-up"])]
    _, k, draft = best
    measured = []
    for adapted in (False, True):
        spec = f"self-speculate(exit={k + 1}, draft={draft}" + (f", heads='{_heads(export, EXITS)}')" if adapted else ")")
        built = build(export, export, spec)
        if built.engine is None:
            measured.append({"pipeline": spec, "note": built.status})
            continue
        engine = built.engine
        prompt_ids = ids[: 2 if QUICK else 4]
        plain_s, plain = _tokens_per_s(lambda: generate(engine.run, prompt_ids[:1], new))
        for d in sorted({1, draft, 2 * draft}):
            spec_s, result = _tokens_per_s(lambda d=d: speculate(engine.run, prompt_ids[:1], new, d))
            same = all((speculate(engine.run, row[None], new, d).ids == generate(engine.run, row[None], new).ids).all()
                       for row in prompt_ids)
            measured.append({"pipeline": f"exit={k + 1}, draft={d}", "adapter": "yes" if adapted else "no",
                             "acceptance": f"{result.extra['acceptance']:.2f}", "tokens/s": f"{spec_s:.1f}",
                             "plain tokens/s": f"{plain_s:.1f}", "speed-up": f"{spec_s / plain_s:.2f}x",
                             "equals greedy": "yes" if same else "NO",
                             "target": f">= {SPEED_TARGET}x {T._check(spec_s / plain_s >= SPEED_TARGET)}" if adapted else ""})
    tables.append(("self-speculation measured on ONNX Runtime (exit and draft picked by the estimate above)",
                   f"batch 1, {new} new tokens; plain = the same engine's decode program; equality checked on "
                   f"{len(prompt_ids)} prompts", measured,
                   ["pipeline", "adapter", "acceptance", "tokens/s", "plain tokens/s", "speed-up", "equals greedy",
                    "target"]))
    return tables


def _teacher_forced_row(engine, ids: np.ndarray, prompt: int) -> tuple[np.ndarray, list[int]]:
    """One passage (`ids` `[1, total]`): prefill the prompt, then feed the rest one token a
    step, as the engine generates; the logits of each step and its exit depths."""
    mask = np.ones((1, prompt), dtype=np.int64)
    out = engine.run({"input_ids": ids[:, :prompt], "attention_mask": mask,
                      "position_ids": np.arange(prompt)[None]}, "prefill")
    logits, depths = [out["logits"][0, -1]], []
    for t in range(prompt, ids.shape[1] - 1):
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], 1)
        feeds = {"input_ids": ids[:, t:t + 1], "attention_mask": mask, "position_ids": np.full((1, 1), t)}
        feeds.update({"past_" + k.removeprefix("present_"): v for k, v in out.items() if k.startswith("present_")})
        out = engine.run(feeds, "decode")
        logits.append(out["logits"][0, -1])
        if "exit_layer" in out:
            depths.append(int(out["exit_layer"]))
    return np.stack(logits), depths


def _teacher_forced_exits(engine, ids: np.ndarray, prompt: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Every passage on its own (batch 1, so each leaves when it alone is confident): the
    predictions, the NLL of the fed tokens and the exit depths."""
    runs = [_teacher_forced_row(engine, ids[i:i + 1], prompt) for i in range(len(ids))]
    stacked = np.stack([logits for logits, _ in runs]).astype(np.float64)
    logp = stacked - stacked.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, prompt:, None], -1)[..., 0]
    return stacked.argmax(-1), nll, [d for _, depths in runs for d in depths]


def early_section() -> tuple[list[dict], str]:
    export, tokenizer = _smollm2()
    prompts, prompt, new = (2, 64, 16) if QUICK else (4, 96, 48)
    ids = _prompts(tokenizer, prompts, prompt + new)
    base = build(export, export, "")
    want, base_nll, _ = _teacher_forced_exits(base.engine, ids, prompt)
    heads = _heads(export, EXITS)
    thresholds = ExitHeads.load(heads).thresholds
    settings = [("calibrated (target 0.99)", "")] + ([] if QUICK else [("threshold 0.5", ", threshold=0.5")])
    rows, engines = [], []
    for label, override in settings:
        built = build(export, export, f"early-exit(at={EARLY_AT}, heads='{heads}'{override})")
        if built.engine is None:
            rows.append({"pipeline": label, "note": built.status})
            continue
        got, nll, depths = _teacher_forced_exits(built.engine, ids, prompt)
        used = [thresholds[k] for k in EARLY_AT] if not override else [0.5] * len(EARLY_AT)
        engines.append(built.engine)
        rows.append({"pipeline": f"early-exit at {EARLY_AT}, {label}", "thresholds": ", ".join(f"{t:.2f}" for t in used),
                     "agreement": f"{(got == want).mean():.3f}", "ppl": f"{math.exp(nll.mean()):.2f}",
                     "mean depth": f"{np.mean(depths):.1f}",
                     "exits": f"{np.mean(np.array(depths) < 30):.1%}"})
    progress(f"timing {1 + len(engines)} engines round-robin")
    steps = prompts * (new - 1)
    times = interleaved_ms([lambda e=e: _teacher_forced_exits(e, ids, prompt) for e in [base.engine, *engines]],
                           warmup=0, runs=3, budget_s=300)
    out = [{"pipeline": "full model", "agreement": "1.000", "ppl": f"{math.exp(base_nll.mean()):.2f}",
            "mean depth": "30", "exits": "0.0%", "decode tokens/s": f"{steps / times[0] * 1e3:.1f}"}]
    for row, ms in zip([r for r in rows if "agreement" in r], times[1:]):
        row.update({"decode tokens/s": f"{steps / ms * 1e3:.1f}", "speed ratio": f"{times[0] / ms:.2f}x"})
    note = (f"{prompts} held-out passages, each on its own (batch 1): {prompt}-token prompt, then {new} teacher-forced "
            f"tokens one decode step each; tokens/s from the whole pass (prefills included), engines timed round-robin, "
            f"median of 3")
    return out + rows, note


def digits_section() -> tuple[list[dict], str]:
    model, (x_test, y_test), metrics = digits.digits_vit(progress)
    # thresholds chosen on the training images would trust a model that fits them perfectly:
    # calibrate on half of the held-out images and measure on the other half
    x_calib, x_test, y_test = x_test[::2], x_test[1::2], y_test[1::2]
    params = dict(batch=2, seq_len=0, weights=digits._key())
    export = T.cached_export("digits-vit", params, lambda out: export_model(model, out, batch=2, seq_len=0))
    base = build(export, export / "model.pt2", "")
    images = x_test.numpy()
    labels = y_test.numpy()

    def accuracy_and_depth(engine) -> tuple[float, float]:
        right, depth = 0, []
        for i in range(len(images)):
            out = engine.run({"pixel_values": images[i:i + 1]})
            right += int(out["logits"].argmax(-1)[0] == labels[i])
            depth.append(int(out.get("exit_layer", 4)))
        return right / len(images), float(np.mean(depth))

    base_acc, _ = accuracy_and_depth(base.engine)
    rows = [{"pipeline": "full model", "top-1": f"{100 * base_acc:.1f}", "mean depth": "4.00"}]
    engines = []
    for target in ([0.99] if QUICK else [0.999, 0.99, 0.95, 0.9]):
        heads = T.CACHE / "heads" / f"digits-heldout-{target}-{digits._key()}.safetensors"
        if not heads.is_file():
            calibrate_model(load(export / "model.pt2"), data={"pixel_values": x_calib.numpy()}, at=[0, 1, 2],
                            out=heads, target_agreement=target, progress=lambda m: progress(f"  {m}"))
        built = build(export, export / "model.pt2", f"early-exit(heads='{heads}')")
        if built.engine is None:
            rows.append({"pipeline": f"target {target}", "note": built.status})
            continue
        acc, depth = accuracy_and_depth(built.engine)
        engines.append(built.engine)
        rows.append({"pipeline": f"exits after blocks 0, 1, 2, calibrated to {target}", "top-1": f"{100 * acc:.1f}",
                     "delta (points)": f"{100 * (acc - base_acc):+.1f}", "mean depth": f"{depth:.2f}"})
    sample = [{"pixel_values": images[i:i + 1]} for i in range(0, len(images), 3)]
    times = interleaved_ms([lambda e=e: [e.run(f) for f in sample] for e in [base.engine, *engines]],
                           warmup=1, runs=5, budget_s=60)
    for row, t in zip([r for r in rows[1:] if "top-1" in r], times[1:]):
        ratio = times[0] / t
        row["throughput"] = f"{ratio:.2f}x"
        row["target"] = f">= 1.5x within 1 point {T._check(ratio >= 1.5 and float(row['delta (points)']) >= -1)}"
    note = (f"{len(images)} test images, batch 1 (each image leaves on its own); calibrated on the other "
            f"{len(x_calib)} held-out images; the full model scores {100 * metrics['test_top1']:.1f}% on all 450 in torch")
    return rows, note


SECTIONS = ("speculate", "early", "digits")


def main() -> None:
    global QUICK, REUSE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--quick", action="store_true", help="a smoke test: fewer prompts, tokens and settings")
    parser.add_argument("--fresh", action="store_true", help="rebuild the engines even when cached")
    parser.add_argument("--reuse-engines", action="store_true",
                        help="take the newest cached engine of each pipeline, built from any source version")
    args = parser.parse_args()
    QUICK, REUSE, T.FRESH = args.quick, args.reuse_engines, args.fresh
    setup_threads()
    sections = Sections([s.strip() for s in args.only.split(",") if s.strip()])
    sections.run("speculate", "self-speculation", ["pipeline"], speculate_section)  # its tables name their own columns
    sections.run("early", "early exit on SmolLM2-135M-Instruct (calibrated adapters)",
                 ["pipeline", "thresholds", "agreement", "ppl", "mean depth", "exits", "decode tokens/s", "speed ratio",
                  "note"],
                 early_section)
    sections.run("digits", "early exit on the digits ViT (4 blocks, trained here): test top-1 against depth",
                 ["pipeline", "top-1", "delta (points)", "mean depth", "throughput", "target", "note"], digits_section)
    print(f"\nearly exit and self-speculation on ONNX Runtime CPU ({THREADS} threads)")
    sections.print()
    print(f"\ntotal {time.perf_counter() - T.START:.0f} s; cache: {T.CACHE}")


if __name__ == "__main__":
    main()
