"""Baseline: eager torch against the unoptimized ONNX Runtime engine, and the cost of `optimize`.

ViT-B/16 (224 px) at batch 1 and 8, and a 12-layer GPT-2-size decoder prefilling 512 tokens:
eager latency, engine latency and their ratio, measured side by side in one process with the
same thread count; and the wall time of `optimize` on each (ONNX export and parity check
included). Targets on the 2-core machine: optimize under 60 s for ViT-B/16 and under 120 s for
the decoder's two programs. Random weights: latency does not depend on them.
"""
from __future__ import annotations

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


def main() -> None:
    setup_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = bench_vit(root) + bench_decoder(root)
    print(f"\nbaseline: eager torch vs unoptimized ONNX Runtime engine ({THREADS} threads each, medians)")
    print_table(rows, ["model", "workload", "eager_ms", "engine_ms", "speedup", "optimize_s"])


if __name__ == "__main__":
    main()
