"""skimformer tune against hand-picked pipelines, on the models of the token benchmark.

- MiniLM (all-MiniLM-L6-v2, real weights, 256 tokens, batch 8), budget `cosine>=0.99`: tune
  searches on rows packed with sentences of the shipped texts (every fourth row half-filled), and
  the engine it picks is measured again on rows of sentences it never saw, beside the token
  benchmark's hand-picked rows (`benchmarks/tokens.py`'s MINILM_SPECS), all engines timed
  round-robin: the check is that tune's engine meets the budget on the unseen rows and is at
  least as fast as the fastest hand-picked row within the same budget.
- The digits ViT (trained by the token benchmark's recipe), budget `top1-drop<=1` with labels:
  tune searches on half of the test images, the other half is the unseen check; the same
  comparison with DIGITS_SPECS; when nothing within the budget is faster, tune says so.
- SmolLM2-135M-Instruct, budget `agreement>=0.99`: the pipeline tune picks, its teacher-forced
  figures on held-out passages, and its prefill, decode and request speed against the
  unoptimized engine.
- Ray: the MiniLM search with `--ray auto` on 2 workers of 1 thread against one worker of 1
  thread, the same trials and seed: wall time, and both Pareto fronts.

Cosine is the embedding's (mean-pool over the attention mask), as in the token benchmark and in
tune. Exports and hand-picked engines share the token benchmark's cache (.cache/bench-tokens);
tune's folders go to .cache/bench-tune. `--only`, `--trials`, `--llm-trials`, `--llm-space`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import THREADS, Sections, interleaved_samples, setup_threads  # noqa: E402
import tokens as tok  # noqa: E402  (the token benchmark's exports, hand-picked rows and cached engines)

import transformers  # noqa: E402

from skimformer.backends.engine import Engine  # noqa: E402
from skimformer.tuning import tune_model  # noqa: E402
from skimformer.tuning.figures import paired_ratio  # noqa: E402
from skimformer.zoo import digits, real  # noqa: E402
from skimformer.zoo.hf_export import export_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / ".cache" / "bench-tune"
TUNE_ROWS, UNSEEN_ROWS, LENGTH, BATCH = 64, 32, 256, 8
progress = tok.progress


def _tune(name: str, model: Path, budget: str, data, trials: int, **kwargs) -> tuple[object, float]:
    start = time.perf_counter()
    result = tune_model(model, budget, OUT / name, data=data, trials=trials, seed=0, force=True,
                        progress=lambda m: progress(f"  tune {name}: {m}"), warn=lambda m: progress(f"warning: {m}"),
                        **kwargs)
    return result, time.perf_counter() - start


def _speed_rows(engines: list[tuple[str, Engine]], feeds: dict, budget_s: float, runs: int) -> dict[str, list[float]]:
    """Each engine's milliseconds per call, round by round, all timed round-robin."""
    samples = interleaved_samples([lambda e=e: e.run({k: feeds[k] for k in e.input_names()}) for _, e in engines],
                                  warmup=1, runs=runs, budget_s=budget_s)
    return {name: s for (name, _), s in zip(engines, samples)}


def _slower(samples: dict, name: str, than: str) -> bool:
    """Whether engine `name` is slower than `than` beyond timing noise (paired rounds, 90% bound)."""
    return paired_ratio(samples[name], samples[than])["ratio_bound"] > 1.0


def _compare(tuned_label: str, tuned_ok: bool, samples: dict, within: dict, fidelity: dict, fmt) -> tuple[list, str]:
    """Rows for tune's engine and the hand-picked ones (throughput against the unoptimized engine:
    the rounds' paired ratio and its 90% lower bound), and the verdict line."""
    speed = {name: paired_ratio(samples["unoptimized"], s) for name, s in samples.items()}
    x = lambda name: f"{speed[name]['ratio']:.2f}x ({speed[name]['ratio_bound']:.2f})"  # noqa: E731
    best_hand = max((s for s in within if within[s] and s not in ("unoptimized", "tune")),
                    key=lambda s: speed[s]["ratio"], default=None)
    rows = [{"engine": "unoptimized", "pipeline": "", "throughput (90% bound)": "1.00x",
             "fidelity (unseen)": fmt(fidelity["unoptimized"]), "budget": "ok"}]
    rows.append({"engine": "tune", "pipeline": tuned_label, "throughput (90% bound)": x("tune"),
                 "fidelity (unseen)": fmt(fidelity["tune"]), "budget": "ok" if tuned_ok else "MISS"})
    for spec in (s for s in samples if s not in ("unoptimized", "tune")):
        rows.append({"engine": "hand-picked", "pipeline": spec, "throughput (90% bound)": x(spec),
                     "fidelity (unseen)": fmt(fidelity[spec]), "budget": "ok" if within[spec] else "out"})
    rival = best_hand or "unoptimized"
    verdict = ("no hand-picked row is within the budget" if best_hand is None else
               f"fastest hand-picked row within the budget: {best_hand} at {x(best_hand)}")
    as_fast = not _slower(samples, "tune", rival)
    verdict += (f"; tune's engine {x('tune')}: meets the budget on unseen rows {tok._check(tuned_ok)}, "
                f"at least as fast as {rival} (not slower beyond timing noise) {tok._check(as_fast)}")
    return rows, verdict


# -- MiniLM ---------------------------------------------------------------------------------------

def minilm_inputs():
    model_dir = real.minilm_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    texts, used = tok._packed_rows(tokenizer, TUNE_ROWS + UNSEEN_ROWS, LENGTH)  # unseen rows: later sentences
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=LENGTH, return_tensors="np")
    enc = {k: v.astype(np.int64) for k, v in enc.items()}
    params = dict(batch=2, seq_len=LENGTH)
    export = tok.cached_export("minilm", params, lambda out: real.export_minilm(out, **params))
    return export, {k: v[:TUNE_ROWS] for k, v in enc.items()}, {k: v[TUNE_ROWS:] for k, v in enc.items()}, used


def minilm_section(trials: int):
    export, data, unseen, used = minilm_inputs()
    result, seconds = _tune("minilm", export / "model.pt2", "cosine>=0.99", data, trials, batch=BATCH, threads=THREADS)
    base = tok.build(export, export / "model.pt2", "")
    hand = [b for b in (tok.build(export, export / "model.pt2", s) for s in tok.MINILM_SPECS) if b.engine is not None]
    engines = [("unoptimized", base.engine), ("tune", result.engine), *((b.spec, b.engine) for b in hand)]
    embeddings = {}
    for name, engine in engines:
        chunks = [tok._embed(engine.run({k: v[i:i + BATCH] for k, v in unseen.items() if k in engine.input_names()})
                             ["last_hidden_state"], unseen["attention_mask"][i:i + BATCH])
                  for i in range(0, UNSEEN_ROWS, BATCH)]
        embeddings[name] = np.concatenate(chunks)
    cosine = {name: float((e * embeddings["unoptimized"]).sum(-1).mean()) for name, e in embeddings.items()}
    full = [i for i in range(UNSEEN_ROWS) if i % 4 != 3][:BATCH]
    progress(f"timing MiniLM: {len(engines)} engines round-robin")
    samples = _speed_rows(engines, {k: v[full] for k, v in unseen.items()}, budget_s=60, runs=7)
    within = {name: c >= 0.99 for name, c in cosine.items()}
    rows, verdict = _compare(result.chosen["label"] if result.chosen else "unoptimized", within["tune"], samples, within,
                             cosine, lambda c: f"{c:.4f}")
    s = result.summary
    note = (f"tune: {s['trials']['total']} trials ({s['trials']['complete']} measured, {s['trials']['pruned']} pruned, "
            f"{s['trials']['failed']} failed) in {seconds:.0f} s on {TUNE_ROWS} rows; {s['answer']}\n"
            f"unseen: {UNSEEN_ROWS} rows of {used} sentences' later ones, none in tune's rows; throughput on {BATCH} "
            f"full rows\n{verdict}")
    return rows, note


# -- the digits ViT -------------------------------------------------------------------------------

def digits_section(trials: int):
    model, (x_test, y_test), _ = digits.digits_vit(progress)
    params = dict(batch=2, seq_len=0, weights=digits._key())
    export = tok.cached_export("digits-vit", params, lambda out: export_model(model, out, batch=2, seq_len=0))
    x, y = x_test.numpy(), y_test.numpy()
    half = len(y) // 2
    data = {"pixel_values": x[:half], "labels": y[:half]}
    result, seconds = _tune("digits", export / "model.pt2", "top1-drop<=1", data, trials, batch=half, threads=THREADS)
    base = tok.build(export, export / "model.pt2", "")
    hand = [b for b in (tok.build(export, export / "model.pt2", s) for s in tok.DIGITS_SPECS) if b.engine is not None]
    engines = [("unoptimized", base.engine), ("tune", result.engine), *((b.spec, b.engine) for b in hand)]
    feeds = {"pixel_values": x[half:]}
    top1 = {name: float((e.run(feeds)["logits"].argmax(-1) == y[half:]).mean()) for name, e in engines}
    progress(f"timing the digits ViT: {len(engines)} engines round-robin")
    samples = _speed_rows(engines, feeds, budget_s=20, runs=15)
    drop = {name: 100 * (top1["unoptimized"] - t) for name, t in top1.items()}
    within = {name: d <= 1.0 for name, d in drop.items()}
    rows, verdict = _compare(result.chosen["label"] if result.chosen else "unoptimized", within["tune"], samples, within,
                             {n: (top1[n], drop[n]) for n in top1}, lambda v: f"top-1 {100 * v[0]:.1f} ({-v[1]:+.1f})")
    s = result.summary
    note = (f"tune: {s['trials']['total']} trials ({s['trials']['complete']} measured, {s['trials']['pruned']} pruned, "
            f"{s['trials']['failed']} failed) in {seconds:.0f} s on {half} labelled test images; {s['answer']}\n"
            f"unseen: the other {len(y) - half} test images, batch {len(y) - half}\n{verdict}")
    return rows, note


# -- SmolLM2 --------------------------------------------------------------------------------------

def llm_section(trials: int, space: str):
    params = dict(batch=2, seq_len=32)
    export = tok.cached_export("smollm2", params, lambda out: real.export_smollm2(out, **params))
    result, seconds = _tune("smollm2", export, "agreement>=0.99", None, trials, space=space, batch=1,
                            threads=THREADS)
    s, chosen = result.summary, result.chosen
    held = s["held_out"]
    rows = []
    for r in result.front:
        timing = r.get("timing") or {}
        rows.append({"trial": "-" if r["trial"] is None else r["trial"], "pipeline": r["label"],
                     "request": tok._x(r["speed"]), "prefill": tok._x(timing.get("prefill_ratio")),
                     "decode": tok._x(timing.get("decode_ratio")),
                     "agreement": f"{r['figures']['agreement']:.3f}",
                     "ppl-ratio": f"{r['figures'].get('ppl-ratio', 1.0):.3f}",
                     "budget": "ok" if r.get("within_budget") else "out",
                     "chosen": "<-" if chosen and r["trial"] == chosen["trial"] else ""})
    figures = ", ".join(f"{k} {v:.4f}" for k, v in held["figures"].items())
    note = (f"tune: {s['trials']['total']} trials ({s['trials']['complete']} measured, {s['trials']['pruned']} pruned, "
            f"{s['trials']['failed']} failed) in {seconds:.0f} s, space {space}; {s['answer']}\n"
            f"chosen engine on {s['inputs']['held_out_rows']} held-out passages: {figures}"
            + ("" if held["speed"] is None else
               f"; request {held['speed']:.2f}x, prefill {held['timing']['prefill_ratio']:.2f}x, "
               f"decode {held['timing']['decode_ratio']:.2f}x ({s['inputs']['prompt_tokens']}-token prompt, "
               f"{held['timing']['decode_tokens']} decode steps)")
            + "\nthe Pareto front (request = prefill + decode steps; ratios against the unoptimized engine):")
    return rows, note


# -- Ray ------------------------------------------------------------------------------------------

def ray_section(trials: int):
    export, data, _, _ = minilm_inputs()
    runs = {}
    runs["1 worker, 1 thread"] = _tune("minilm-1-worker", export / "model.pt2", "cosine>=0.99", data, trials,
                                       batch=BATCH, threads=1)
    runs["Ray, 2 workers of 1 thread"] = _tune("minilm-ray", export / "model.pt2", "cosine>=0.99", data, trials,
                                               batch=BATCH, threads=1, ray="auto", workers=2)
    rows = []
    for name, (result, seconds) in runs.items():
        front = ", ".join(f"{r['label']} {r['speed']:.2f}x" for r in result.front if r["trial"] is not None)
        rows.append({"run": name, "wall s": f"{seconds:.0f}", "trials": result.summary["trials"]["total"],
                     "chosen": result.chosen["label"] if result.chosen else "unoptimized", "front": front})
    (one, t1), (ray, t2) = runs.values()
    same = {r["label"] for r in one.front} == {r["label"] for r in ray.front}
    note = (f"the same {trials} trials (seed 0) on MiniLM: Ray {t1 / t2:.2f}x less wall time "
            f"{tok._check(t2 < t1)}; the same configurations on both fronts {tok._check(same)}")
    return rows, note


SECTIONS = ("minilm", "digits", "llm", "ray")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--trials", type=int, default=16, help="trials of the MiniLM, digits and Ray searches")
    parser.add_argument("--llm-trials", type=int, default=8, help="trials of the SmolLM2 search")
    parser.add_argument("--llm-space", default="tokens,kv,skip,weights",
                        help="SmolLM2's space (exit adds a calibration of about 7 minutes)")
    args = parser.parse_args()
    setup_threads()
    sections = Sections([s.strip() for s in args.only.split(",") if s.strip()])
    compare = ["engine", "pipeline", "throughput (90% bound)", "fidelity (unseen)", "budget"]
    sections.run("minilm", "all-MiniLM-L6-v2, 256 tokens, batch 8, budget cosine>=0.99", compare,
                 lambda: minilm_section(args.trials))
    sections.run("digits", "digits ViT (17 tokens, 4 layers), budget top1-drop<=1 (labels)", compare,
                 lambda: digits_section(args.trials))
    sections.run("llm", "SmolLM2-135M-Instruct, budget agreement>=0.99",
                 ["trial", "pipeline", "request", "prefill", "decode", "agreement", "ppl-ratio", "budget", "chosen"],
                 lambda: llm_section(args.llm_trials, args.llm_space))
    sections.run("ray", "Ray: the MiniLM search on 2 workers against 1", ["run", "wall s", "trials", "chosen", "front"],
                 lambda: ray_section(args.trials))
    print(f"\nskimformer tune on ONNX Runtime CPU ({THREADS} threads unless said; ratios against the unoptimized "
          f"engine, timed round-robin)")
    sections.print()
    print(f"\ntotal {time.perf_counter() - tok.START:.0f} s; tune folders: {OUT}")


if __name__ == "__main__":
    main()
