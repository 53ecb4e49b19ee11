"""Baseline: eager torch against the unoptimized ONNX Runtime engine, and the cost of `optimize`.

ViT-B/16 (224 px) at batch 1 and 8, and a 12-layer GPT-2-size decoder prefilling 512 tokens:
eager latency, engine latency and their ratio, measured side by side in one process with the
same thread count; and the wall time of `optimize` on each (ONNX export and parity check
included). Random weights: latency does not depend on them.

Build times (issue #14, targets on 2 idle cores, verification included): the `optimize` command
as a user runs it, on SmolLM2-135M (real weights) without passes (< 90 s) and with one pass
(< 150 s), and on ViT-B/16 with `tome` (< 60 s). `--only builds` runs these alone.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, median_ms, print_table, setup_threads  # noqa: E402

from skimformer.api import optimize_model  # noqa: E402
from skimformer.ir import load  # noqa: E402
from skimformer.zoo import build_model  # noqa: E402
from skimformer.zoo.hf_export import export_model  # noqa: E402


def _optimize(source: Path, out: Path) -> tuple[object, float]:
    start = time.perf_counter()
    engine, _ = optimize_model(load(source), out, [])
    return engine, time.perf_counter() - start


def bench_vit(root: Path) -> list[dict]:
    model = build_model("vit", "realistic")
    export_model(model, root / "vit", batch=1, seq_len=0, static=False)
    engine, optimize_s = _optimize(root / "vit" / "model.pt2", root / "vit-engine")
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            eager = median_ms(lambda: model(pixel_values=x))
        onnx = median_ms(lambda: engine.run({"pixel_values": x.numpy()}))
        rows.append({"model": "ViT-B/16", "workload": f"batch {batch}, 224 px", "eager_ms": f"{eager:.1f}",
                     "engine_ms": f"{onnx:.1f}", "speedup": f"{eager / onnx:.2f}x",
                     "optimize_s": f"{optimize_s:.1f} (target < 60)"})
    return rows


def bench_decoder(root: Path) -> list[dict]:
    model = build_model("gpt2", "realistic")
    export_model(model, root / "gpt2", batch=1, seq_len=32, static=False)
    engine, optimize_s = _optimize(root / "gpt2", root / "gpt2-engine")
    n = 512
    ids = torch.randint(0, model.config.vocab_size, (1, n))
    mask = torch.ones(1, n, dtype=torch.long)
    pos = torch.arange(n)[None]
    with torch.no_grad():
        eager = median_ms(lambda: model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True))
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    onnx = median_ms(lambda: engine.run(feeds, "prefill"))
    return [{"model": "GPT-2 124M (12 layers)", "workload": f"prefill {n} tokens", "eager_ms": f"{eager:.1f}",
             "engine_ms": f"{onnx:.1f}", "speedup": f"{eager / onnx:.2f}x",
             "optimize_s": f"{optimize_s:.1f} (target < 120, 2 programs)"}]


CACHE = Path(__file__).resolve().parent.parent / ".cache" / "bench-builds"
BUILDS = [  # (model, passes, target seconds)
    ("smollm2", None, 90),
    ("smollm2", "prompt-prune(layer=2, keep=0.5)", 150),
    ("smollm2", "kv-quant(scheme=channel, bits=8)", 150),
    ("smollm2", "kv-window(sink=4, window=256)", 150),
    ("smollm2", "kv-quant(bits=8)", 150),
    ("smollm2", "kv-evict(policy=h2o, keep=0.5)", 150),
    ("smollm2", "self-speculate(exit=8, draft=4)", 150),
    ("vit-b16", "tome(r=8)", 60),
]


def _source(name: str) -> Path:
    """The exported model, once per cache (export time is not the compiler's)."""
    from skimformer.zoo import real

    if name == "smollm2":
        out = CACHE / "smollm2"
        if not (out / "decode.pt2").exists():
            real.export_smollm2(out)
        return out
    out = CACHE / "vit-b16"
    if not (out / "model.pt2").exists():
        export_model(build_model("vit", "realistic"), out, batch=1, seq_len=0, static=False)
    return out / "model.pt2"


def bench_builds(root: Path) -> list[dict]:
    """Wall time of the `optimize` command, one fresh process per build, as a user runs it."""
    rows = []
    for name, passes, target in BUILDS:
        source = _source(name)
        cmd = [str(Path(sys.executable).parent / "optimize"), str(source), "-o", str(root / "engine"), "--force"]
        cmd += ["--passes", passes] if passes else []
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        verdict = "FAILED: " + done.stderr.strip().splitlines()[-1] if done.returncode else \
            ("ok" if seconds < target else "over target")
        rows.append({"model": name, "passes": passes or "none", "optimize_s": f"{seconds:.1f}",
                     "target_s": f"< {target}", "verdict": verdict})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["latency", "builds"], help="run one part")
    args = parser.parse_args()
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only != "builds":
            rows = bench_vit(root) + bench_decoder(root)
            print(f"\nbaseline: eager torch vs unoptimized ONNX Runtime engine ({THREADS} threads each, medians)")
            print_table(rows, ["model", "workload", "eager_ms", "engine_ms", "speedup", "optimize_s"])
        if args.only != "latency":
            builds = bench_builds(root)
            print(f"\nbuild times: `optimize` wall seconds, fresh process each ({_cores()} cores)")
            print_table(builds, ["model", "passes", "optimize_s", "target_s", "verdict"])


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
