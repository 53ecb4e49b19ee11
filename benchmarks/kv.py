"""KV-cache compression: the full cache against kv-window / kv-evict / kv-quant, side by side.

Everything runs on ONNX Runtime CPU (2 threads, the same for every engine), on SmolLM2-135M-Instruct
with its real weights (30 layers, 3 KV heads of 64: an fp32 cache of 46,080 bytes a token), except
the flatness check (the tiny zoo Llama). Sections (`--only`):

- `speed`: KV bytes per token and in total at a 2,000-token context (every tensor the engine
  carries from step to step: `present_*` and `state_*`, the mask excluded), and the latency of one
  decode step at contexts 1,000 / 2,000 / 4,000 and batch 1 / 8, every engine of a row timed
  round-robin (medians). The step's `past` is what the engine's own prefill returns: prefill on
  real text of 500, 1,000 and 2,000 tokens (batch 1); contexts 1,000 and 2,000 use those outputs
  as they are, 4,000 is synthesized from the 2,000-token outputs (each axis that grew from 1,000
  to 2,000 tokens extended linearly, its values tiled; an axis that stopped growing, such as a
  full window, kept) and batch 8 repeats the batch-1 rows. Beside each measured step-time ratio
  (full / compressed) its ceiling (weight bytes + full KV bytes) / (weight bytes + compressed KV
  bytes), and measured / ceiling.
- `fidelity`: 20 prompts of 384 tokens from the shipped texts. The full-cache engine generates 256
  greedy tokens from them (batch 20); each engine then prefills the same prompts and is fed those
  reference tokens (teacher forcing): one decode step a token, or chunks of 64 tokens when its
  decode program is a plain growing cache (no `state_*`, no returned mask, every carried tensor
  grows by the tokens fed: a probe step checks), where a chunk equals as many single steps;
  agreement = fraction of the 20 x 256 positions where its argmax equals the reference token.
  From the same prefill, the next 64 tokens of each text are fed the same way for perplexity.
  kv-evict keeps a fraction of the prompt at prefill; the kv-window rows hold as many tokens
  (sink + window = keep x 384) and keep rolling. Agreement is measured for kv-quant 8 and 4 bits
  (the targets) and snapkv / knorm at keep 0.5 (chunked, cheap); perplexity for those and kv-quant
  2 bits, snapkv and the window at keep 0.75 / 0.5 / 0.25, and h2o at 0.5 (the time budget: a
  stepwise agreement costs ~256 batch-20 decode steps an engine).
- `passkey`: a 5-digit number hidden in 2,000 tokens of filler at 20 depths, asked for at the end
  through the instruct chat template; greedy answer (8 tokens), hit = the number appears in it.
- `flat`: cache bytes along a 4,000-token greedy generation on the tiny zoo Llama, full cache
  and kv-window(window=512), read from the tensors each decode step returns.
- `kvpress`: kvpress's SnapKVPress and StreamingLLMPress at compression ratios 0.25 / 0.5 / 0.75
  on the same model and the first 5 fidelity prompts (torch eager is slow here), with their
  continuations and reference tokens, beside our matching rows on those prompts; in a subprocess
  of the separate virtualenv `make kvpress-env` sets up (kvpress 0.5.5 pins transformers < 5.3;
  ours is newer). Skipped, saying why, when that virtualenv is absent.

Targets: kv-quant(bits=4) KV bytes <= 0.3x of the fp32 cache at 2,000 tokens with agreement
>= 0.9; kv-quant(bits=8) agreement >= 0.99; kv-evict(policy=snapkv, keep=0.5) passkey accuracy
>= 90% of the full cache's (checked only if the full cache scores >= 50%); kv-window(window=512)
cache bytes flat over 4,000 generated tokens; decode step measured >= 0.8 of its ceiling.
A pipeline whose pass is not registered prints "n/a (pass missing)"; `--passes` picks pass names
or whole pipelines (the others print "n/a (not selected)"); `--quick` is a smoke test (fewer
prompts, tokens, depths and runs). Exports and engines are cached under .cache/bench-kv: an engine
is rebuilt when any source file of skimformer changes (`--fresh` rebuilds all; `--reuse-engines`
takes the newest cached engine of each pipeline whatever its source digest). A SmolLM2 engine
takes several minutes to build on this machine, so a cold run is much longer than a warm one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, Sections, grown, interleaved_ms, print_table, setup_threads  # noqa: E402
import tokens as T  # noqa: E402  (cached exports and engine builds, shared with the token-reduction benchmark)

import transformers  # noqa: E402

from skimformer.backends.teacher_forcing import Decoder, forced_logits  # noqa: E402
from skimformer.passes.registry import all_passes  # noqa: E402
from skimformer.zoo import build_model, real, texts  # noqa: E402
from skimformer.zoo.hf_export import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T.CACHE = Path(os.environ.get("SKIMFORMER_BENCH_KV_CACHE") or ROOT / ".cache" / "bench-kv")
KVPRESS_PY = ROOT / ".cache" / "kvpress-venv" / "bin" / "python"
progress = T.progress

Q8, Q4, Q2 = "kv-quant(bits=8)", "kv-quant(bits=4)", "kv-quant(bits=2)"
H2O, KNORM = "kv-evict(policy=h2o, keep=0.5)", "kv-evict(policy=knorm, keep=0.5)"
WIN512 = "kv-window(sink=4, window=512)"
SINK = 4


def snap(keep: float) -> str:
    return f"kv-evict(policy=snapkv, keep={keep})"


def window_for(keep: float, prompt: int) -> str:
    """The kv-window whose cache (sink + window) holds `keep` of a `prompt`-token prompt."""
    return f"kv-window(sink={SINK}, window={round(keep * prompt) - SINK})"


SPEED_SPECS = [Q8, Q4, Q2, snap(0.5), H2O, WIN512, f"{snap(0.5)}; {Q4}"]
CONTEXTS = (1000, 2000, 4000)
BATCHES = (1, 8)
BYTES_CONTEXT = 2000
PROBE_LENGTHS = (500, 1000, 2000)  # prefill lengths the speed rows' caches come from
KEEPS = (0.75, 0.5, 0.25)

PROMPT = 384          # fidelity prompts (tokens)
PROMPTS = 20
GENERATE = 256        # reference greedy tokens per prompt
CONTINUATION = 64     # real text tokens after each prompt, for perplexity
CHUNK = 64            # tokens per decode step where the engine's decode allows several

KVPRESS_PROMPTS = 5   # torch eager is slow here: kvpress runs on the first 5 fidelity prompts

PASSKEY_TOKENS = 2000
PASSKEY_DEPTHS = 20
PASSKEY_BATCH = 1  # a 2,000-token prefill holds [B, 2000, 49152] fp32 logits and ORT arenas keep their peak: 4 rows reached 19 GB
PASSKEY_SPECS = [snap(0.5), WIN512]  # each costs 20 prefills of 2,000 tokens

FLAT_STEPS = 4000
FLAT_SPEC = WIN512

QUICK = False
REUSE = False
START = T.START


# -- engines --------------------------------------------------------------------------------------

def smollm2_export() -> Path:
    params = dict(batch=2, seq_len=32)
    return T.cached_export("smollm2", params, lambda out: real.export_smollm2(out, **params))


def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(real.smollm2_dir(), local_files_only=True)


_BUILT: dict[tuple[str, str], T.Built] = {}


def engine(export: Path, spec: str) -> T.Built:
    """The engine of the SmolLM2 (or another decoder) export under `spec`, built once per run."""
    key = (str(export), spec)
    if spec and not selected(spec):
        return T.Built(spec, status="n/a (not selected)")
    if key not in _BUILT:
        _BUILT[key] = (REUSE and not T._skipped(spec) and T.newest_cached(export, spec)) or T.build(export, export, spec)
    return _BUILT[key]


SELECTED: list[str] | None = None  # --passes: pass names and/or whole pipelines


def _squash(spec: str) -> str:
    return "".join(spec.split())


def selected(spec: str) -> bool:
    """--passes: a pipeline runs if it is listed itself, or every pass in it is listed by name."""
    if SELECTED is None:
        return True
    names = set(T._names(spec))
    return _squash(spec) in {_squash(x) for x in SELECTED} or names <= set(SELECTED)


def weight_bytes(built: T.Built) -> int:
    return int(built.report.get("memory", {}).get("weights_bytes") or 0)


# -- teacher forcing on an engine (skimformer.backends.teacher_forcing) ---------------------------

def chunkable(decoder: Decoder) -> bool:
    """Whether feeding k tokens in one decode step is the same as k steps of one token: a plain
    growing cache (no `state_*`, no returned mask, every carried tensor grows by k on axis 2)."""
    probe = decoder.fork()
    probe.step(np.zeros((probe.mask.shape[0], 2), dtype=np.int64))
    if probe.returns_mask or any(name.startswith("state_") for name in probe.carried):
        return False
    for before, after in probe.grew.values():
        if len(before) != 4 or after[2] != before[2] + 2 or after[:2] != before[:2] or after[3] != before[3]:
            return False
    return set(probe.grew) == set(probe.carried)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def teacher_forced(decoder: Decoder, tokens: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Feed `tokens` [B, n] after the prompt (on a fork of `decoder`); returns the argmax at each of the
    n positions and the negative log-likelihood of each token (position 0 is predicted by the prefill)."""
    preds, nll, j = [], [], 0
    for logits in forced_logits(decoder, tokens, chunk):
        preds.append(logits.argmax(-1))
        target = tokens[:, j:j + logits.shape[1]]
        nll.append(-np.take_along_axis(log_softmax(logits), target[..., None], axis=-1)[..., 0])
        j += logits.shape[1]
    return np.concatenate(preds, 1), np.concatenate(nll, 1)


# -- formatting -----------------------------------------------------------------------------------

def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _check(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _label(spec: str) -> str:
    return spec or "full cache (unoptimized)"


TARGETS: list[dict] = []  # collected across sections, printed at the end


def target(name: str, value: str, ok: bool | None, note: str = "") -> None:
    TARGETS.append({"target": name, "measured": value, "result": "not checked" if ok is None else _check(ok),
                    "note": note})


# -- speed: KV bytes and decode-step latency ------------------------------------------------------

def _step_feeds(carried: dict[str, np.ndarray], mask_len: int, position: int, batch: int) -> dict:
    rep = {k: np.repeat(v, batch, axis=0) if v.shape[0] == 1 else v for k, v in carried.items()}
    return {"input_ids": np.full((batch, 1), 42, dtype=np.int64),
            "attention_mask": np.ones((batch, mask_len + 1), dtype=np.int64),
            "position_ids": np.full((batch, 1), position, dtype=np.int64), **rep}


def speed_section() -> list[tuple]:
    tok = tokenizer()
    export = smollm2_export()
    base = engine(export, "")
    if base.engine is None:
        return [("SmolLM2-135M: KV bytes and decode-step latency", "", [{"pipeline": "full cache", "note": base.status}],
                 ["pipeline", "note"])]
    built = [engine(export, spec) for spec in SPEED_SPECS]
    live = [b for b in [base, *built] if b.engine is not None]
    lengths = PROBE_LENGTHS
    ids = np.asarray(tok(texts.passage(max(lengths), 0, tok))["input_ids"][:max(lengths)], dtype=np.int64)[None]
    caches, masks = {}, {}
    for b in live:  # prefill at each probe length: the cache representation of each engine
        progress(f"speed: prefill {'/'.join(map(str, lengths))} tokens on {_label(b.spec)}")
        per_name: dict[str, list] = {}
        mask_lens = []
        for n in lengths:
            d = Decoder.prefill(b.engine.run, ids[:, :n])
            for name, v in d.carried.items():
                per_name.setdefault(name, []).append(v)
            mask_lens.append(d.mask.shape[1])
        caches[b.spec] = per_name
        masks[b.spec] = mask_lens
    weights = weight_bytes(base)

    def carried_at(spec: str, n: int) -> tuple[dict, int]:
        per_name, mask_lens = caches[spec], masks[spec]
        if n in lengths:
            i = lengths.index(n)
            return {k: v[i] for k, v in per_name.items()}, mask_lens[i]
        synthesized = grown(per_name, lengths, n)
        a, b = mask_lens[-2], mask_lens[-1]
        mask_len = b if a == b else round(b + (b - a) * (n - lengths[-1]) / (lengths[-1] - lengths[-2]))
        return synthesized, mask_len

    def kv_bytes(spec: str, n: int, batch: int = 1) -> int:
        return batch * sum(v.nbytes for v in carried_at(spec, n)[0].values())

    rows = []
    full2k = kv_bytes("", BYTES_CONTEXT)
    for b in [base, *built]:
        row = {"pipeline": _label(b.spec)}
        if b.engine is None:
            rows.append({**row, "note": b.status})
            continue
        total = kv_bytes(b.spec, BYTES_CONTEXT)
        row.update({"KV bytes/token": f"{total / BYTES_CONTEXT:,.0f}",
                    "KV total": _mb(total), "vs fp32": f"{total / full2k:.3f}x", "note": b.status})
        if b.spec == Q4:
            target(f"{Q4}: KV bytes <= 0.3x fp32 at {BYTES_CONTEXT} tokens", f"{total / full2k:.3f}x",
                   total / full2k <= 0.3)
        rows.append(row)
    speed_rows = []
    for n in CONTEXTS:
        for batch in BATCHES:
            feeds = [_step_feeds(*carried_at(b.spec, n), n, batch) for b in live]
            kvs = [batch * sum(v.nbytes for v in carried_at(b.spec, n)[0].values()) for b in live]
            progress(f"speed: decode step at context {n}, batch {batch}: {len(live)} engines round-robin")
            times = interleaved_ms([lambda e=b.engine, f=f: e.run(f, "decode") for b, f in zip(live, feeds)],
                                   warmup=1, runs=3 if QUICK else 7, budget_s=10 if QUICK else 25)
            del feeds
            for b, ms, kv in zip(live, times, kvs):
                row = {"pipeline": _label(b.spec), "context": n, "batch": batch, "KV total": _mb(kv),
                       "step ms": f"{ms:.1f}"}
                if b.spec:
                    measured, ceiling = times[0] / ms, (weights + kvs[0]) / (weights + kv)
                    ok = measured >= 0.8 * ceiling
                    row.update({"measured": f"{measured:.2f}x", "ceiling": f"{ceiling:.2f}x",
                                "measured/ceiling": f"{measured / ceiling:.2f}", "target": f">=0.8 {_check(ok)}"})
                speed_rows.append(row)
    misses = [r for r in speed_rows if "MISSED" in r.get("target", "")]
    checked = [r for r in speed_rows if r.get("target")]
    if checked:
        worst = min(checked, key=lambda r: float(r["measured/ceiling"]))
        target("decode step: measured >= 0.8 of ceiling, every row",
               f"{len(checked) - len(misses)}/{len(checked)} rows; worst {worst['measured/ceiling']} "
               f"({worst['pipeline']}, {worst['context']}, batch {worst['batch']})", not misses)
    bytes_note = (f"KV = every tensor carried from step to step (present_*, state_*; not the mask), measured on "
                  f"each engine's prefill of {BYTES_CONTEXT} tokens of text (batch 1); fp32 full cache = 30 layers x "
                  f"2 x 3 KV heads x 64 x 4 bytes a token")
    speed_note = (f"weights {_mb(weights)} (fp32, tied embedding counted once). Step inputs (documented choice): each "
                  f"engine's own prefill outputs on text of {'/'.join(map(str, lengths))} tokens (batch 1); context "
                  f"4000 extended from the 2000-token outputs (axes that grew from 1000 to 2000 grow on linearly, "
                  f"values tiled; axes that stopped growing, a full window, stay); batch 8 = the batch-1 rows "
                  f"repeated. One new token a step. measured = full step ms / compressed step ms; ceiling = "
                  f"(weights + full KV) / (weights + compressed KV)")
    return [("SmolLM2-135M: KV bytes at a 2,000-token context", bytes_note, rows,
             ["pipeline", "KV bytes/token", "KV total", "vs fp32", "note"]),
            ("SmolLM2-135M: decode-step latency", speed_note, speed_rows,
             ["pipeline", "context", "batch", "KV total", "step ms", "measured", "ceiling", "measured/ceiling",
              "target"])]


# -- fidelity: agreement and perplexity -----------------------------------------------------------

def _prompts(tok, count: int, prompt: int, continuation: int) -> tuple[np.ndarray, np.ndarray]:
    seqs = [tok(texts.passage(prompt + continuation, i, tok))["input_ids"][:prompt + continuation]
            for i in range(count)]
    ids = np.asarray(seqs, dtype=np.int64)
    return ids[:, :prompt], ids[:, prompt:]


_REFERENCE: dict = {}
PER_PROMPT: dict[str, dict[str, np.ndarray]] = {}  # fidelity results per prompt, for the kvpress comparison


def reference_tokens(base: T.Built, prompts: np.ndarray, generate: int) -> tuple[np.ndarray, float]:
    """The full-cache engine's greedy continuation of `prompts` (computed once a run) and its seconds."""
    key = (prompts.tobytes(), generate)
    if key not in _REFERENCE:
        progress(f"reference generation: {prompts.shape[0]} prompts x {generate} greedy tokens, full cache")
        t0 = time.perf_counter()
        _REFERENCE[key] = (base.engine.generate(prompts, max_new_tokens=generate), time.perf_counter() - t0)
    return _REFERENCE[key]



def agreement_specs(prompt: int) -> list[str]:
    """Pipelines measured for agreement (20 x 256 teacher-forced tokens) and perplexity: the targets, and
    the evictions that keep a chunked decode (cheap). Stepwise agreement costs ~256 batch-20 steps an engine."""
    return [Q8, Q4, snap(0.5), KNORM]


def ppl_specs(prompt: int) -> list[str]:
    """Pipelines measured for perplexity only (64 tokens after the prompt)."""
    return [Q2, snap(0.75), snap(0.25), *[window_for(k, prompt) for k in KEEPS], H2O]


def fidelity_section() -> tuple[list[dict], str]:
    tok = tokenizer()
    count, generate, prompt = (4, 32, PROMPT) if QUICK else (PROMPTS, GENERATE, PROMPT)
    prompts, continuation = _prompts(tok, count, prompt, CONTINUATION)
    export = smollm2_export()
    base = engine(export, "")
    if base.engine is None:
        return [{"pipeline": "full cache", "note": base.status}], ""
    agree_specs = agreement_specs(prompt)
    order = [Q8, Q4, Q2, *[snap(k) for k in KEEPS], *[window_for(k, prompt) for k in KEEPS], KNORM, H2O]
    assert set(order) == set(agree_specs) | set(ppl_specs(prompt))
    built = [engine(export, spec) for spec in order]
    reference, ref_s = reference_tokens(base, prompts, generate)
    rows, agree, ppl, cache = [], {}, {}, {}
    for b in [base, *built]:
        row = {"pipeline": _label(b.spec)}
        if b.engine is None:
            rows.append({**row, "note": b.status})
            continue
        progress(f"fidelity: {_label(b.spec)}")
        t0 = time.perf_counter()
        try:
            d = Decoder.prefill(b.engine.run, prompts)
            cache[b.spec] = d.cache_bytes / count
            chunk = CHUNK if chunkable(d) else 1
            if b.spec in ("", *agree_specs):
                pred, _ = teacher_forced(d, reference, chunk)
                agree[b.spec] = float((pred == reference).mean())
                PER_PROMPT.setdefault(b.spec, {})["match"] = pred == reference
            nll = teacher_forced(d, continuation, chunk)[1]
            ppl[b.spec] = math.exp(float(nll.mean()))
            PER_PROMPT.setdefault(b.spec, {})["nll"] = nll
        except Exception as e:  # an engine under development must not stop the other rows
            traceback.print_exc(file=sys.stderr)
            rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        row.update({"cache after prefill": f"{cache[b.spec] / 2**20:.2f} MiB/seq", "chunk": chunk,
                    "agreement": f"{agree[b.spec]:.3f}" if b.spec in agree else "",
                    "ppl": f"{ppl[b.spec]:.2f}", "s": f"{time.perf_counter() - t0:.0f}", "note": b.status})
        if "" in cache:
            row["vs full"] = f"{cache[b.spec] / cache['']:.2f}x"
            row["ppl vs full"] = f"{ppl[b.spec] / ppl['']:.3f}x"
        rows.append(row)
        progress(f"  {row}")  # the figures reach the log even if a later row stops the run
    for spec, threshold in ((Q4, 0.9), (Q8, 0.99)):
        name = f"{spec}: next-token agreement >= {threshold}"
        if spec in agree:
            target(name, f"{agree[spec]:.3f}", agree[spec] >= threshold,
                   f"{count} prompts x {generate} tokens" if QUICK else "")
        else:
            target(name, "", None, "no engine: " + _status(built, spec))
    note = (f"{count} prompts of {prompt} tokens from the shipped texts. agreement: the full-cache engine generates "
            f"{generate} greedy tokens from each ({ref_s:.0f} s), each engine prefills the prompt and is fed those "
            f"tokens (teacher forcing); fraction of the {count} x {generate} positions whose argmax matches. ppl: the "
            f"next {CONTINUATION} tokens of each text after its prompt, fed the same way after the same prefill. "
            f"kv-evict keep = fraction of the prompt kept at prefill; the kv-window rows hold as many tokens (sink "
            f"{SINK} + window = keep x {prompt}) and keep rolling. chunk = tokens per decode step: {CHUNK} where the "
            f"decode program is a plain growing cache (a probe step checks: no state, no returned mask), else 1")
    return rows, note


def _status(built: list[T.Built], spec: str) -> str:
    return next((b.status for b in built if b.spec == spec), "not built")


# -- passkey ----------------------------------------------------------------------------------------

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n\n")
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompts(tok, total: int, depths: int) -> tuple[np.ndarray, list[str]]:
    """`depths` prompts of exactly the same token count (about `total`), the needle at evenly spread depths."""
    rng = np.random.default_rng(4)
    keys = [str(k) for k in rng.integers(10000, 100000, size=depths)]
    encode = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    if getattr(tok, "chat_template", None):
        marker = "XQXQX"
        chat = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                       add_generation_prompt=True)
        head, tail = chat.split(marker)
        answer = "The pass key is"
        question = "\n\nWhat is the pass key?"
    else:
        head, tail, answer, question = "", "", "", QUESTION
    needles = [encode(f" The pass key is {k}. Remember it. {k} is the pass key. ") for k in keys]
    fixed = encode(head) + encode(INTRO) + encode(question) + encode(tail) + encode(answer)
    length = max(map(len, needles))
    filler_len = total - len(fixed) - length
    filler = encode(FILLER * (filler_len // 15 + 2))[:filler_len]
    rows = []
    for i, needle in enumerate(needles):
        at = round(i * filler_len / max(1, depths - 1))
        pad = encode(FILLER)[:length - len(needle)]  # equal lengths: pad short needles with filler
        body = filler[:at] + needle + pad + filler[at:]
        rows.append(encode(head) + encode(INTRO) + body + encode(question) + encode(tail) + encode(answer))
    return np.asarray(rows, dtype=np.int64), keys


def passkey_section() -> tuple[list[dict], str]:
    tok = tokenizer()
    depths, length = (4, 1000) if QUICK else (PASSKEY_DEPTHS, PASSKEY_TOKENS)
    prompts, keys = passkey_prompts(tok, length, depths)
    export = smollm2_export()
    base = engine(export, "")
    if base.engine is None:
        return [{"pipeline": "full cache", "note": base.status}], ""
    built = [engine(export, spec) for spec in PASSKEY_SPECS]
    rows, acc = [], {}
    for b in [base, *built]:
        row = {"pipeline": _label(b.spec)}
        if b.engine is None:
            rows.append({**row, "note": b.status})
            continue
        progress(f"passkey: {_label(b.spec)}, {depths} prompts of {prompts.shape[1]} tokens")
        t0 = time.perf_counter()
        hits, answers = [], []
        try:
            for i in range(0, depths, PASSKEY_BATCH):  # the prefill's logits are [B, 2000, 49152] fp32
                out = b.engine.generate(prompts[i:i + PASSKEY_BATCH], max_new_tokens=8)
                for j, ids in enumerate(out):
                    text = tok.decode(ids, skip_special_tokens=True)
                    answers.append(text.strip())
                    hits.append(keys[i + j] in text)
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            rows.append({**row, "note": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"})
            continue
        acc[b.spec] = float(np.mean(hits))
        by_depth = "".join("x" if h else "." for h in hits)
        rows.append({**row, "accuracy": f"{100 * acc[b.spec]:.0f}%", "by depth (0 -> 100%)": by_depth,
                     "first answer": answers[0][:24], "s": f"{time.perf_counter() - t0:.0f}", "note": b.status})
        progress(f"  {rows[-1]}")
    spec = snap(0.5)
    name = f"{spec}: passkey >= 90% of the full cache's"
    if "" in acc and spec in acc:
        ratio = acc[spec] / acc[""] if acc[""] else 0.0
        value = f"{100 * acc[spec]:.0f}% vs {100 * acc['']:.0f}% ({ratio:.2f})"
        if acc[""] < 0.5:
            target(name, value, None, "full cache scores below 50%: figures only")
        else:
            target(name, value, ratio >= 0.9)
    else:
        target(name, "", None, "no engine: " + (_status(built, spec) if "" in acc else base.status))
    note = (f"{depths} prompts of {prompts.shape[1]} tokens (chat template, filler sentences repeated), a 5-digit "
            f"pass key at evenly spread depths; greedy, 8 new tokens; hit = the key appears in the answer")
    return rows, note


# -- flat: cache bytes over a long generation -----------------------------------------------------

def flat_section() -> tuple[list[dict], str]:
    params = dict(batch=2, seq_len=16)
    export = T.cached_export("llama-tiny", params, lambda out: export_model(build_model("llama", "tiny"), out, **params))
    steps = 1200 if QUICK else FLAT_STEPS
    rows, marks = [], sorted({1, 100, 500, 1000, 2000, 3000, steps} & set(range(1, steps + 1)))
    prompt = np.arange(3, 35, dtype=np.int64)[None]
    for spec in ["", FLAT_SPEC]:
        b = engine(export, spec)
        row = {"pipeline": _label(spec)}
        if b.engine is None:
            rows.append({**row, "note": b.status})
            continue
        progress(f"flat: {_label(spec)}, {steps} greedy tokens on the tiny Llama")
        d, sizes, t0 = Decoder.prefill(b.engine.run, prompt), [], time.perf_counter()
        token = d.last_logits.argmax(-1)[:, None]
        for _ in range(steps):
            token = d.step(token)[:, -1].argmax(-1)[:, None].astype(np.int64)
            sizes.append(d.cache_bytes)
        for m in marks:
            row[f"after {m}"] = f"{sizes[m - 1] / 1024:.0f} KiB"
        peak = max(sizes)
        first = sizes.index(peak)  # the step at which the cache stops growing, if it does
        flat = all(s == peak for s in sizes[first:]) and first < len(sizes) // 2
        row.update({"peak": f"{peak / 1024:.0f} KiB", "peak from step": first + 1, "flat": "yes" if flat else "no",
                    "s": f"{time.perf_counter() - t0:.0f}"})
        rows.append(row)
        if spec == FLAT_SPEC:
            target(f"{FLAT_SPEC}: cache bytes flat over {FLAT_STEPS} generated tokens",
                   f"{'constant' if flat else 'not constant'} at {peak / 1024:.0f} KiB from step {first + 1} to {steps}",
                   flat and steps >= FLAT_STEPS, "" if steps >= FLAT_STEPS else f"--quick: {steps} steps only")
    if not any(t["target"].startswith(FLAT_SPEC) for t in TARGETS):
        target(f"{FLAT_SPEC}: cache bytes flat over {FLAT_STEPS} generated tokens", "", None,
               "no engine: " + rows[-1].get("note", ""))
    note = (f"tiny zoo Llama (random weights), prompt of 32 tokens, {steps} greedy decode steps of one token; "
            f"bytes of every tensor carried after each step; flat = the bytes reach their peak within the first half "
            f"of the generation and never change after it")
    return rows, note


# -- kvpress --------------------------------------------------------------------------------------

KVPRESS_SCRIPT = r'''
import contextlib, copy, json, math, sys, time
import torch, transformers
from transformers import DynamicCache
from kvpress import SnapKVPress, StreamingLLMPress
torch.set_num_threads(int(sys.argv[3]))
job = json.load(open(sys.argv[1]))
model = transformers.AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32,
                                                          attn_implementation="sdpa").eval()
PRESSES = {"SnapKVPress": SnapKVPress, "StreamingLLMPress": StreamingLLMPress}
prompts = torch.tensor(job["prompts"])
n = prompts.shape[1]


def forced(cache, first, feed, chunk=64):
    # feed `feed` after the compressed prompt in chunks (these presses compress at prefill only, so a chunk of
    # k tokens equals k steps of one); positions count on from the prompt's length, as kvpress's pipeline does
    logits = [first]
    for j in range(0, feed.shape[1] - 1, chunk):
        part = feed[:, j:min(j + chunk, feed.shape[1] - 1)]
        pos = torch.arange(n + j, n + j + part.shape[1])[None].expand(feed.shape[0], -1)
        logits.append(model(input_ids=part, past_key_values=cache, position_ids=pos).logits)
    logits = torch.cat(logits, 1).double()
    nll = -torch.log_softmax(logits, -1).gather(-1, feed[..., None])[..., 0]
    return logits.argmax(-1), nll


results = []
with torch.no_grad():
    for name, ratio in [(None, 0.0)] + [(p, r) for p in job["presses"] for r in job["ratios"]]:
        t0 = time.perf_counter()
        cache = DynamicCache()
        with PRESSES[name](compression_ratio=ratio)(model) if name else contextlib.nullcontext():
            first = model(input_ids=prompts, past_key_values=cache, logits_to_keep=1).logits
        kept = cache.get_seq_length()
        reference = torch.tensor(job["reference"])
        pred, _ = forced(copy.deepcopy(cache), first, reference)
        _, nll = forced(cache, first, torch.tensor(job["continuation"]))
        row = {"press": name or "none (full cache, torch)", "ratio": ratio, "kept": kept,
               "ppl": math.exp(nll.mean().item()), "agreement": (pred == reference).double().mean().item(),
               "s": time.perf_counter() - t0}
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
json.dump(results, open(sys.argv[2], "w"))
'''


def kvpress_section() -> tuple[list[dict], str]:
    if not KVPRESS_PY.is_file():
        why = (f"kvpress is not set up: it needs its own virtualenv ({KVPRESS_PY.parent.parent.relative_to(ROOT)}), "
               f"since kvpress 0.5.5 pins transformers<5.3 and ours is {transformers.__version__}; "
               f"set it up with `make kvpress-env` (installs torch 2.13.0 CPU, transformers<5.3, kvpress)")
        return [{"press": "SnapKVPress, StreamingLLMPress", "note": why}], ""
    check = subprocess.run([str(KVPRESS_PY), "-c", "import kvpress, transformers, importlib.metadata as m; "
                            "print(transformers.__version__, m.version('kvpress'))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return [{"press": "SnapKVPress, StreamingLLMPress",
                 "note": f"the kvpress virtualenv does not import kvpress ({last}); run `make kvpress-env` again"}], ""
    tok = tokenizer()
    count, generate = (2, 32) if QUICK else (KVPRESS_PROMPTS, GENERATE)
    every = 4 if QUICK else PROMPTS  # the fidelity section's prompts: kvpress runs on the first `count` of them
    prompts, continuation = _prompts(tok, every, PROMPT, CONTINUATION)
    export = smollm2_export()
    base = engine(export, "")
    if base.engine is None:
        return [{"press": "all", "note": base.status}], ""
    if (prompts.tobytes(), generate) in _REFERENCE:  # the fidelity section ran: the same reference tokens
        reference = reference_tokens(base, prompts, generate)[0][:count]
    else:
        reference = reference_tokens(base, prompts[:count], generate)[0]
    prompts, continuation = prompts[:count], continuation[:count]
    ratios = [round(1 - k, 2) for k in KEEPS]
    job = {"model": str(real.smollm2_dir()), "prompts": prompts.tolist(), "continuation": continuation.tolist(),
           "reference": reference.tolist(), "presses": ["SnapKVPress", "StreamingLLMPress"], "ratios": ratios}
    with tempfile.TemporaryDirectory(prefix="kvpress-") as tmp:
        (Path(tmp) / "job.json").write_text(json.dumps(job))
        (Path(tmp) / "run.py").write_text(KVPRESS_SCRIPT)
        progress(f"kvpress: {len(job['presses'])} presses x {len(ratios)} ratios in {KVPRESS_PY.parent.parent.name}")
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
        proc = subprocess.Popen([str(KVPRESS_PY), str(Path(tmp) / "run.py"), str(Path(tmp) / "job.json"),
                                 str(Path(tmp) / "out.json"), str(THREADS)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=env)
        tail: list[str] = []
        for line in proc.stderr:  # one JSON line per finished press and ratio; anything else kept for errors
            if line.startswith("{"):
                r = json.loads(line)
                progress(f"kvpress: {r['press']} ratio {r['ratio']}: ppl {r['ppl']:.2f}, agreement "
                         f"{r['agreement']:.3f} ({r['s']:.0f} s)")
            elif line.strip():
                tail = (tail + [line.rstrip()])[-40:]
        if proc.wait() != 0:
            sys.stderr.write("\n".join(tail) + "\n")
            last = tail[-1] if tail else "?"
            return [{"press": "SnapKVPress, StreamingLLMPress", "note": f"kvpress run failed: {last[:120]}"}], ""
        results = json.loads((Path(tmp) / "out.json").read_text())
        version, kvpress_version = check.stdout.split()
    rows = []
    for r in results:
        row = {"press": r["press"], "compression ratio": r["ratio"], "cache tokens": r["kept"],
               "agreement": f"{r['agreement']:.3f}", "ppl": f"{r['ppl']:.2f}",
               "ppl vs full": f"{r['ppl'] / results[0]['ppl']:.3f}x", "s": f"{r['s']:.0f}"}
        keep = round(1 - r["ratio"], 2)
        ours = {"SnapKVPress": snap(keep), "StreamingLLMPress": window_for(keep, PROMPT)}.get(r["press"], "")
        mine, full = PER_PROMPT.get(ours), PER_PROMPT.get("")
        if ours:
            row["ours (same prompts)"] = ours
        if mine and full:
            row["ours ppl vs full"] = f"{math.exp(mine['nll'][:count].mean()) / math.exp(full['nll'][:count].mean()):.3f}x"
            if "match" in mine:
                row["ours agreement"] = f"{mine['match'][:count].mean():.3f}"
        rows.append(row)
    note = (f"kvpress {kvpress_version} in its own virtualenv (transformers {version}, torch eager, {THREADS} threads) "
            f"on the first {count} of the fidelity prompts ({PROMPT} tokens) and their continuations; compression "
            f"ratio = fraction of the prompt removed at prefill (kvpress's presses compress the prompt once: "
            f"StreamingLLMPress keeps 4 sinks + the most recent tokens, with no rolling window while decoding; "
            f"SnapKVPress window 64, pool 5). agreement: against the same {generate} reference tokens of our "
            f"full-cache engine; ppl vs full: against torch's own full cache (first row). ours: the matching "
            f"pipeline of the fidelity table on the same prompts (agreement where that table measured it)")
    return rows, note


# -- main -----------------------------------------------------------------------------------------

SECTIONS = ("speed", "fidelity", "passkey", "flat", "kvpress")


def main() -> None:
    global QUICK, REUSE, SELECTED
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--passes", nargs="+", metavar="SPEC",
                        help="measure only these: pass names (kv-quant) and/or whole pipelines of the tables "
                             "(\"kv-quant(bits=4)\"); the full cache always runs (default: everything)")
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and runs (a smoke test)")
    parser.add_argument("--fresh", action="store_true", help="rebuild the engines even when cached")
    parser.add_argument("--reuse-engines", action="store_true",
                        help="use cached engines even if skimformer's source changed since they were built")
    args = parser.parse_args()
    QUICK, REUSE = args.quick, args.reuse_engines
    T.FRESH = args.fresh
    SELECTED = [p.strip() for item in args.passes for p in (item.split(",") if "(" not in item else [item])
                if p.strip()] if args.passes else None
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    setup_threads()
    registered = ", ".join(sorted(all_passes()))
    progress(f"registered passes: {registered}")
    missing = sorted({n for spec in SPEED_SPECS + agreement_specs(PROMPT) + ppl_specs(PROMPT) + PASSKEY_SPECS for n in T.missing_passes(spec)})
    sections = Sections(only)
    run = sections.run

    run("speed", "SmolLM2-135M: KV bytes and decode-step latency", ["pipeline", "note"], speed_section)
    run("fidelity", "SmolLM2-135M: teacher-forced next-token agreement and perplexity",
        ["pipeline", "cache after prefill", "vs full", "chunk", "agreement", "ppl", "ppl vs full", "s", "note"],
        fidelity_section)
    run("passkey", "SmolLM2-135M: passkey retrieval",
        ["pipeline", "accuracy", "by depth (0 -> 100%)", "first answer", "s", "note"], passkey_section)
    run("flat", "cache bytes along a long generation (tiny Llama)",
        ["pipeline", "after 1", "after 100", "after 500", "after 1000", "after 1200", "after 2000", "after 3000",
         f"after {FLAT_STEPS}", "peak", "peak from step", "flat", "s", "note"], flat_section)
    run("kvpress", "kvpress on SmolLM2-135M (same prompts)",
        ["press", "compression ratio", "cache tokens", "agreement", "ppl", "ppl vs full", "ours (same prompts)",
         "ours agreement", "ours ppl vs full", "s", "note"], kvpress_section)

    print(f"\nKV-cache compression on ONNX Runtime CPU ({THREADS} threads, every engine of a table timed "
          f"round-robin, medians){' [--quick: fewer prompts, tokens and runs]' if QUICK else ''}")
    if missing:
        print(f"passes not registered (their rows say n/a): {', '.join(missing)}")
    sections.print()
    if TARGETS:
        print("\ntargets")
        print_table(TARGETS, ["target", "measured", "result", "note"])
    print(f"\ntotal {time.perf_counter() - START:.0f} s; registered passes: {registered}; cache: {T.CACHE}")


if __name__ == "__main__":
    main()
