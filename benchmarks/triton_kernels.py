"""Triton kernels of the `skim` ops against their plain-torch references, on a CUDA GPU.

For every op that has a Triton launcher (`KERNELS` of `skimformer.kernels.triton_kv` and, when
present, `skimformer.kernels.triton_tokens`; ops without one are listed as skipped), at realistic
sizes: token ops on ViT-B/16 (197 tokens, 12 heads x 64, width 768) and BERT-base (512 tokens,
padded) at batch 8; KV-cache ops on a Llama-style cache (32 query heads, 8 KV heads, 128 dims,
8k tokens, fp16) at batch 1 and 8, with KIVI 4-bit (group 32, residual 128).

Each call is timed as GPU time: captured once in a CUDA graph (eager launches where capture
fails, marked `eager`), replayed after warm-up with CUDA events around each replay and the L2
cache flushed before it; the median of `--runs` replays. Columns: milliseconds of the Triton
launcher and of the reference, the speed-up, and achieved memory bandwidth (bytes the op must
move at least, read once and written once, over the Triton time) as GB/s and % of the GPU's peak
HBM bandwidth (H100 SXM 3,350 GB/s, H100 PCIe 2,000, H200 4,800; from the device name, or
`--peak-gbs`), and TFLOP/s for ops dominated by dot products. Memory-bound rows that move at
least 32 MB are checked against >= 70% of peak (smaller transfers take about as long as a
launch, so their bandwidth says little). A last table compares `quant_attention` over a 4-bit
cache with fp16 `scaled_dot_product_attention` over the same cache in full precision at 8k
tokens, target >= 2x (the 4-bit cache with its scales is about a third of the bytes).

Runs with torch and triton alone: `PYTHONPATH=src python benchmarks/triton_kernels.py`. Without CUDA it
exits with a message, unless `--interpret-smoke`: then every kernel runs once on tiny CPU shapes
under Triton's interpreter and is compared with its reference (exit status 1 on a mismatch).
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import statistics
import sys
import traceback
from dataclasses import dataclass
from typing import Callable

if "--interpret-smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table  # noqa: E402  (stdlib and torch only, like this file)

LAUNCHER_MODULES = ("skimformer.kernels.triton_kv", "skimformer.kernels.triton_tokens")
PEAK_GBS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))  # first match of the device name
TARGET_PEAK_FRACTION = 0.7
TARGET_MIN_BYTES = 32 * 2 ** 20  # below this, launch latency (a few microseconds) outweighs the transfer
TARGET_SDPA_SPEEDUP = 2.0


@dataclass
class Case:
    """One op at one size: its arguments, and the bytes it must move and FLOPs it must do."""

    op: str
    shape: str
    args: tuple
    bytes: int
    flops: int = 0
    memory_bound: bool = True  # judged by bandwidth (False: dot products or a latency-bound selection)


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# --- sizes ----------------------------------------------------------------------------------------

@dataclass
class Sizes:
    batch: int
    vit_tokens: int
    bert_tokens: int
    width: int
    heads: int
    head_dim: int
    cache: int
    q_heads: int
    kv_heads: int
    kv_dim: int
    kv_batches: tuple[int, ...]
    dtype: torch.dtype


FULL = Sizes(batch=8, vit_tokens=197, bert_tokens=512, width=768, heads=12, head_dim=64, cache=8192, q_heads=32,
             kv_heads=8, kv_dim=128, kv_batches=(1, 8), dtype=torch.float16)
TINY = Sizes(batch=2, vit_tokens=13, bert_tokens=17, width=32, heads=2, head_dim=16, cache=70, q_heads=4,
             kv_heads=2, kv_dim=32, kv_batches=(2,), dtype=torch.float32)
BITS, GROUP, RESIDUAL = 4, 32, 128
TINY_GROUP, TINY_RESIDUAL = 16, 5


def token_cases(s: Sizes, device) -> list[Case]:
    """The token ops (prune, tome, prompt-prune, kv-window) at encoder and decoder sizes."""
    from skimformer.kernels import merge, tokens, window

    b, n, c, h, d, dt = s.batch, s.vit_tokens, s.width, s.heads, s.head_dim, s.dtype
    vit = f"ViT B={b} N={n}"
    q, k = (torch.randn(b, h, n, d, device=device, dtype=dt) for _ in range(2))
    x = torch.randn(b, n, c, device=device, dtype=dt)
    scores = torch.rand(b, n, device=device)
    keep = 0.5
    idx = tokens.topk_tokens_ref(scores, None, keep, 1)
    kept = tokens.gather_tokens_ref(x, idx, 1)
    src = tokens.token_sources_ref(idx, n, 0)
    size = merge.token_sizes_ref(x, None, 1)
    metric = k.mean(dim=1)
    r = n // 12
    keep_idx, sources = merge.bipartite_match_ref(metric, size, r, 1)
    m = s.bert_tokens
    bert = f"BERT B={b} N={m} padded"
    qb, kb = (torch.randn(b, h, m, d, device=device, dtype=dt) for _ in range(2))
    pad = torch.ones(b, 1, 1, m, dtype=torch.bool, device=device)
    pad[b // 2:, ..., m * 3 // 4:] = False
    additive = torch.zeros(pad.shape, dtype=dt, device=device).masked_fill(~pad, torch.finfo(dt).min)  # BERT's
    bert_scores = torch.rand(b, m, device=device)
    t, win = s.cache, s.cache // 8
    dec = f"decoder B={b} T={t}"
    cache_mask = torch.ones(b, t, dtype=torch.long, device=device)
    cache_mask[b // 2:, : t // 10] = 0
    step_mask = torch.cat([cache_mask, cache_mask[:, :1] * 0 + 1], dim=1)
    ids = torch.zeros(b, 1, dtype=torch.long, device=device)
    win_idx = window.window_tokens_ref(cache_mask, 4, win - 4)
    cache = torch.randn(b, h, t, d, device=device, dtype=dt)
    windowed = tokens.gather_tokens_ref(cache, win_idx, 2)
    attn_flops = 4 * b * h * m * m * d
    return [
        Case("token_scores", f"{vit} CLS row", (q, k, None, d ** -0.5, 0), nbytes(k, q[:, :, :1]) + 4 * b * n),
        Case("token_scores", f"{bert} all rows", (qb, kb, additive, d ** -0.5, 1), nbytes(qb, kb, additive) + 4 * b * m,
             attn_flops, memory_bound=False),
        Case("topk_tokens", f"{vit} keep={keep}", (scores, None, keep, 1), nbytes(scores, idx), memory_bound=False),
        Case("topk_tokens", f"{bert} keep={keep}", (bert_scores, pad, keep, 1), nbytes(bert_scores, pad) * 2,
             memory_bound=False),
        Case("gather_tokens", f"{vit} C={c} keep={keep}", (x, idx, 1), 2 * nbytes(kept) + nbytes(idx)),
        Case("fuse_tokens", f"{vit} C={c}", (x, scores, None, idx, 1), nbytes(x, scores, idx)),
        Case("restore_tokens", f"{vit} C={c}", (kept, src, 1), 2 * nbytes(x) + nbytes(src)),
        Case("token_sources", f"{vit}", (idx, n, 0), nbytes(idx, src), memory_bound=False),
        Case("token_sizes", f"{vit}", (x, None, 1), nbytes(size), memory_bound=False),
        Case("bipartite_match", f"{vit} r={r}", (metric, size, r, 1), nbytes(metric, size, sources, keep_idx),
             2 * b * (n // 2) ** 2 * d, memory_bound=False),
        Case("bipartite_merge", f"{vit} C={c} r={r}", (x, size, sources, keep_idx, 1),
             nbytes(x, size, sources, keep_idx) + (n - r) * b * c * x.element_size()),
        Case("window_tokens", f"{dec} window={win}", (cache_mask, 4, win - 4), nbytes(cache_mask, win_idx),
             memory_bound=False),
        Case("cache_positions", f"{dec}", (step_mask, ids), nbytes(step_mask, ids) + 8 * b),
        Case("sink_index", f"{dec} window={win}", (win_idx, 4, cache, 2), 2 * nbytes(windowed[:, :, :4])),
        Case("window_join", f"{dec} window={win}", (windowed[:, :, :4], cache, t - win + 4, 2),
             2 * nbytes(windowed)),
    ]


def kv_cases(s: Sizes, device) -> list[Case]:
    """The KV-cache ops (kv-evict, kv-quant) on a Llama-style cache."""
    from skimformer.kernels import evict, quant

    cases = []
    h, h_kv, d, t, dt = s.q_heads, s.kv_heads, s.kv_dim, s.cache, s.dtype
    group, residual = (GROUP, RESIDUAL) if s is FULL else (TINY_GROUP, TINY_RESIDUAL)
    channels = math.gcd(group, d)
    for b in s.kv_batches:
        llama = f"B={b} H={h}/{h_kv}x{d} T={t}"
        k = torch.randn(b, h_kv, t, d, device=device, dtype=dt)
        mask = torch.ones(b, t, dtype=torch.long, device=device)
        mask[b // 2:, : t // 10] = 0
        window = min(32, t // 2)
        prompt_q = torch.randn(b, h, window, d, device=device, dtype=dt)  # the window's queries, the last of the prompt
        scores = evict.kv_attention_scores_ref(prompt_q, k, mask, d ** -0.5, window, 5)
        budget = t // 4
        idx = evict.kv_select_ref(scores, mask, 0.0, budget, window)
        cases += [
            Case("kv_attention_scores", f"{llama} SnapKV window={window}", (prompt_q, k, mask, d ** -0.5, window, 5),
                 nbytes(k, prompt_q, mask, scores), 2 * 2 * b * h * window * t * d, memory_bound=False),
            Case("kv_key_norm_scores", llama, (k,), nbytes(k) + 4 * b * h_kv * t),
            Case("kv_accumulate", llama, (scores[..., :-1], scores), nbytes(scores) * 3),
            Case("kv_select", f"{llama} budget={budget}", (scores, mask, 0.0, budget, window),
                 nbytes(scores, mask, idx), memory_bound=False),
            Case("kv_gather", f"{llama} budget={budget}", (k, idx), 2 * nbytes(k[:, :, :budget]) + nbytes(idx)),
        ]
        codes, kscale, kzero, ktail = quant.kv_quantize_ref(k, BITS, group, residual, 0)
        v = torch.randn_like(k)
        vcodes, vscale, vzero, vtail = quant.kv_quantize_ref(v, BITS, group, residual, channels)
        cases += [
            Case("kv_quantize", f"{llama} keys {BITS}-bit", (k, BITS, group, residual, 0),
                 nbytes(k, codes, kscale, kzero, ktail)),
            Case("kv_quantize", f"{llama} values {BITS}-bit", (v, BITS, group, residual, channels),
                 nbytes(v, vcodes, vscale, vzero, vtail)),
        ]
        grown = torch.cat([ktail, torch.randn(b, h_kv, group, d, device=device, dtype=dt)], dim=2)  # a group to move
        args = (codes, kscale, kzero, grown, BITS, group, residual, 0)
        appended = quant.kv_append_ref(*args)
        cases.append(Case("kv_append", f"{llama} keys +{group} tokens", args, nbytes(*args[:4], *appended)))
        for n in (1, 4):
            q = torch.randn(b, h, n, d, device=device, dtype=dt)
            step = torch.ones(b, 1, n, t, dtype=torch.bool, device=device)
            step[b // 2:, ..., : t // 10] = False
            args = (q, codes, kscale, kzero, vcodes, vscale, vzero, ktail, vtail, step, d ** -0.5, BITS, group,
                    channels)
            # the inputs read once, and an output the size of q
            cases.append(Case("quant_attention", f"{llama} n={n} {BITS}-bit", args, nbytes(*args[:10], q)))
    return cases


def sdpa_cases(s: Sizes, device) -> list[tuple[str, Case, Callable, tuple]]:
    """quant_attention over a 4-bit cache next to fp16 SDPA over the full-precision cache."""
    from skimformer.kernels import quant

    rows = []
    h, d, t, dt = s.q_heads, s.kv_dim, s.cache, s.dtype
    group, residual = (GROUP, RESIDUAL) if s is FULL else (TINY_GROUP, TINY_RESIDUAL)
    channels = math.gcd(group, d)
    for b, h_kv in ((1, s.kv_heads), (8 if s is FULL else 2, s.kv_heads), (1, h)):
        k, v = (torch.randn(b, h_kv, t, d, device=device, dtype=dt) for _ in range(2))
        q = torch.randn(b, h, 1, d, device=device, dtype=dt)
        kq = quant.kv_quantize_ref(k, BITS, group, residual, 0)
        vq = quant.kv_quantize_ref(v, BITS, group, residual, channels)
        args = (q, *kq[:3], *vq[:3], kq[3], vq[3], None, d ** -0.5, BITS, group, channels)
        shape = f"B={b} H={h}/{h_kv}x{d} T={t} n=1"
        case = Case("quant_attention", shape, args, nbytes(*args[:9], q))
        gqa = {"enable_gqa": True} if h != h_kv else {}
        rows.append((shape, case, lambda q, k, v, gqa=gqa: F.scaled_dot_product_attention(q, k, v, **gqa), (q, k, v)))
    return rows


# --- timing --------------------------------------------------------------------------------------

class Timer:
    """GPU time of one call: CUDA-graph replays (eager launches where capture fails) timed with
    CUDA events, the L2 cache flushed before each."""

    def __init__(self, runs: int, warmup: int = 3):
        self.runs, self.warmup = runs, warmup
        self.flush = torch.empty(512 * 2 ** 20, dtype=torch.int8, device="cuda")

    def __call__(self, fn: Callable, args: tuple) -> tuple[float, bool]:
        """Median milliseconds, and whether a graph was replayed."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (Triton compiles here) off the capture stream
            for _ in range(self.warmup):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        run, graphed = (lambda: fn(*args)), False
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(*args)
            run, graphed = graph.replay, True
        except Exception:  # ops that synchronize with the host cannot be captured
            torch.cuda.synchronize()
        samples = []
        for _ in range(self.runs):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return statistics.median(samples), graphed


# --- main ----------------------------------------------------------------------------------------

def launchers() -> tuple[dict[str, Callable], list[str]]:
    """Every Triton launcher found, by op name, and notes on the modules that are missing."""
    found, notes = {}, []
    for name in LAUNCHER_MODULES:
        try:
            found.update(importlib.import_module(name).KERNELS)
        except ImportError as error:
            notes.append(f"{name}: not importable ({error}); its ops are skipped")
    return found, notes


def references() -> dict[str, Callable]:
    from skimformer.kernels import decompositions

    return {op._schema.name: ref for op, ref in decompositions().items()}


def print_notes(notes: list[str], refs: dict, kernels: dict) -> None:
    """The launcher modules that are missing, and the ops left without a launcher."""
    skipped = sorted(name.removeprefix("skim::") for name in set(refs) - set(kernels))
    for note in notes + ([f"skipped (no Triton launcher): {', '.join(skipped)}"] if skipped else []):
        print(note)


def all_cases(sizes: Sizes, device) -> list[Case]:
    return token_cases(sizes, device) + kv_cases(sizes, device)


def peak_gbs(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name()
    return next((gbs for key, gbs in PEAK_GBS if key in name), None)


def benchmark(args) -> int:
    torch.manual_seed(0)
    kernels, notes = launchers()
    refs = references()
    peak = peak_gbs(args.peak_gbs)
    timer = Timer(args.runs)
    print(f"device: {torch.cuda.get_device_name()}, peak HBM bandwidth: "
          f"{f'{peak:,.0f} GB/s' if peak else 'unknown (pass --peak-gbs)'}; torch {torch.__version__}")
    rows = []
    for case in all_cases(FULL, "cuda"):
        name = f"skim::{case.op}"
        if name not in kernels or (args.only and case.op not in args.only):
            continue
        row = {"kernel": case.op, "shape": case.shape}
        try:
            ms, graphed = timer(kernels[name], case.args)
            ref_ms, ref_graphed = timer(refs[name], case.args)
        except Exception as error:  # one failing kernel still leaves the others' rows
            traceback.print_exc(file=sys.stderr)
            rows.append({**row, "triton ms": f"error: {type(error).__name__}"})
            continue
        gbs = case.bytes / ms / 1e6
        row.update({"triton ms": f"{ms:.4f}" + ("" if graphed else " eager"),
                    "ref ms": f"{ref_ms:.4f}" + ("" if ref_graphed else " eager"),
                    "speed-up": f"{ref_ms / ms:.2f}x", "GB/s": f"{gbs:,.0f}",
                    "TFLOP/s": f"{case.flops / ms / 1e9:.1f}" if case.flops else ""})
        if peak:
            row["% peak"] = f"{100 * gbs / peak:.0f}%"
            if case.memory_bound and case.bytes >= TARGET_MIN_BYTES:
                row["target"] = "ok" if gbs >= TARGET_PEAK_FRACTION * peak else f"< {TARGET_PEAK_FRACTION:.0%}"
            elif case.memory_bound:
                row["target"] = "(small)"
        rows.append(row)
    print_table(rows, ["kernel", "shape", "triton ms", "ref ms", "speed-up", "GB/s", "% peak", "TFLOP/s", "target"])
    print(f"target: memory-bound kernels moving >= {TARGET_MIN_BYTES >> 20} MB reach >= {TARGET_PEAK_FRACTION:.0%} "
          "of peak bandwidth (bytes each op must move over its time); smaller ones are latency-bound, and dot "
          "products and selections have no bandwidth target")
    print_notes(notes, refs, kernels)

    if "skim::quant_attention" in kernels and (not args.only or "quant_attention" in args.only):
        sdpa_rows = []
        for shape, case, sdpa, sdpa_args in sdpa_cases(FULL, "cuda"):
            ms, _ = timer(kernels["skim::quant_attention"], case.args)
            sdpa_ms, _ = timer(sdpa, sdpa_args)
            ratio = sdpa_ms / ms
            sdpa_rows.append({"shape": shape, "quant_attention ms": f"{ms:.4f}", "SDPA fp16 ms": f"{sdpa_ms:.4f}",
                              "bytes ratio": f"{nbytes(*sdpa_args, sdpa_args[0]) / case.bytes:.2f}x",
                              "speed-up": f"{ratio:.2f}x",
                              "target": "ok" if ratio >= TARGET_SDPA_SPEEDUP else f"< {TARGET_SDPA_SPEEDUP}x"})
        print()
        print_table(sdpa_rows, ["shape", "quant_attention ms", "SDPA fp16 ms", "bytes ratio", "speed-up", "target"])
        print(f"target: quant_attention over the {BITS}-bit cache >= {TARGET_SDPA_SPEEDUP}x faster than fp16 "
              "scaled_dot_product_attention over the full-precision cache")
    return 0


def smoke() -> int:
    """Every kernel once on tiny CPU shapes under the interpreter, against its reference."""
    torch.manual_seed(0)
    kernels, notes = launchers()
    refs = references()
    rows, failed = [], 0
    cases = all_cases(TINY, "cpu") + [case for _, case, _, _ in sdpa_cases(TINY, "cpu")]
    for case in cases:
        name = f"skim::{case.op}"
        if name not in kernels:
            continue
        try:
            ok, detail = compare(kernels[name](*case.args), refs[name](*case.args))
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            ok, detail = False, f"error: {type(error).__name__}: {error}"
        failed += not ok
        rows.append({"kernel": case.op, "shape": case.shape, "result": "ok" if ok else "MISMATCH", "detail": detail})
    print_table(rows, ["kernel", "shape", "result", "detail"])
    print_notes(notes, refs, kernels)
    print(f"{len(rows) - failed} of {len(rows)} kernel runs match their references")
    return 1 if failed else 0


def compare(actual, expected) -> tuple[bool, str]:
    """Integers equal; floats within fp32 rounding (NaN where the reference has NaN)."""
    if isinstance(expected, (tuple, list)):
        results = [compare(a, e) for a, e in zip(actual, expected)]
        return all(ok for ok, _ in results) and len(actual) == len(expected), "; ".join(d for _, d in results)
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return False, f"{tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}"
    if not expected.dtype.is_floating_point:
        return torch.equal(actual, expected), "exact"
    err = (actual.double() - expected.double()).abs().nan_to_num(0.0).max().item() if actual.numel() else 0.0
    scale = expected.double().abs().nan_to_num(0.0).max().item() if expected.numel() else 0.0
    same_nan = torch.equal(actual.isnan(), expected.isnan())
    return same_nan and err <= 1e-5 * max(1.0, scale), f"max abs err {err:.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interpret-smoke", action="store_true",
                        help="run every kernel once on tiny CPU shapes under Triton's interpreter (no GPU needed)")
    parser.add_argument("--peak-gbs", type=float, help="the GPU's peak HBM bandwidth in GB/s (default: from its name)")
    parser.add_argument("--runs", type=int, default=25, help="timed replays per kernel (the median is reported)")
    parser.add_argument("--only", nargs="*", help="ops to benchmark (default: all)")
    args = parser.parse_args(argv)
    if args.interpret_smoke:
        return smoke()
    if not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU (it times Triton kernels); without one, "
              "`--interpret-smoke` runs every kernel once on CPU under Triton's interpreter", file=sys.stderr)
        return 2
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
