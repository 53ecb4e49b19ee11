"""Build an engine folder: lower every program, check the engine against it, write the reports.

Everything is written into a temporary folder beside the destination and moved into place at
the end, so a failed build (bad input, failed parity) leaves nothing behind.
"""
from __future__ import annotations

import json
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from skimformer import __version__
from skimformer.backends.engine import EXAMPLES, MANIFEST, Engine
from skimformer.backends.forked import can_fork, run_forked
from skimformer.backends.measure import measure_decoder
from skimformer.backends.registry import backend_module, checked_backend
from skimformer.backends.report import write_reports
from skimformer.atomic import atomic_folder
from skimformer.errors import UserError, VerificationError
from skimformer.ir import Model, Program
from skimformer.ir.graph import program_graphs
from skimformer.passes.manager import max_abs_error

Progress = Callable[[str], None]


def program_file(role: str) -> str:
    return "program.pt2" if role == "model" else f"{role}.pt2"


def check_destination(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise UserError(f"{out} already exists: choose another -o folder or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder: choose another -o folder")


def check_dtypes(model: Model) -> None:
    """Refuse programs that compute in bfloat16 before any work. Engines take and return numpy
    arrays, and numpy has no bfloat16 (nor do ONNX Runtime's CPU kernels run it); fp16 engines
    keep the program's dtype at their inputs and outputs. The passes themselves run on bfloat16
    programs."""
    for role, program in model.programs.items():
        if program.precision == torch.bfloat16:
            raise UserError(f"the {role} program computes in bfloat16, which engines cannot take or return (numpy "
                            "has no bfloat16): export the model in float16 (model.half()) or float32 for an engine")


def _lower_and_save(lower: Callable, program: Program, engine_path: Path, program_path: Path | None, **options):
    """One program's lowering, and its `.pt2` written beside the engine: seconds for a rewritten
    program of a 135M-parameter model, which run side by side with the other program's lowering."""
    extra = lower(program, engine_path, **options)
    if program_path is not None:
        program.save(program_path)
    return extra


def lower_model(model: Model, folder: Path, backend: str, progress: Progress,
                options: dict | None = None, save_programs: bool = False) -> dict:
    """Lower each program into `folder` (and save it there when `save_programs`); returns the
    manifest's `programs` section."""
    module = backend_module(backend)
    files = {role: f"{role}{module.SUFFIX}" for role in model.programs}
    jobs = {role: partial(_lower_and_save, module.lower, program, folder / files[role],
                          folder / program_file(role) if save_programs else None, **(options or {}))
            for role, program in model.programs.items()}
    if len(jobs) > 1 and getattr(module, "FORKS", False) and can_fork():
        progress(f"lowering {', '.join(jobs)} to {backend} side by side")
        extras = run_forked(jobs)
    else:
        extras = {}
        for role, job in jobs.items():
            progress(f"lowering {role} to {backend}")
            extras[role] = job()
    programs = {}
    for role, program in model.programs.items():
        engine_file, extra = files[role], extras[role] or {}
        programs[role] = {"engine": engine_file, "program": program_file(role),
                          "inputs": program.input_specs(), "sizes": program.size_ranges(),
                          "outputs": program.output_specs()}
        if extra:
            programs[role]["extra_files"] = extra
    return programs


def _write_manifest(folder: Path, model: Model, backend: str, options: dict, programs: dict) -> dict:
    manifest = {"format": 1, "skimformer": __version__, "backend": backend, "backend_options": options,
                "kind": model.kind, "programs": programs, "generation": model.generation,
                "files": {**{p["engine"]: f"{role} engine" for role, p in programs.items()},
                          **{name: f"{role} {what}" for role, p in programs.items()
                             for name, what in p.get("extra_files", {}).items()},
                          **{p["program"]: f"{role} program (torch.export)" for role, p in programs.items()},
                          EXAMPLES: "example inputs, keys ROLE.INPUT", "report.json": "report", "report.md": "report"}}
    for extra in model.extra_files:
        manifest["files"][extra.name] = "tokenizer or model config"
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


LOSSY_FLOOR = 0.9  # an approximating engine (quantized weights) whose main output is below this cosine is broken


def _cosines(want: dict, got: dict) -> dict[str, float]:
    out = {}
    for name, ref in want.items():
        if ref.is_floating_point() and ref.numel() and name in got:
            r, g = ref.double().flatten(), torch.as_tensor(np.asarray(got[name])).double().flatten()
            out[name] = float(torch.nn.functional.cosine_similarity(r, g, dim=0)) if r.shape == g.shape else -1.0
    return out


ROUNDING_OPS = ("skim.cache_quant_attention", "skim.kv_quantize", "skim.kv_append")
ROUNDED_COSINE = 0.999  # float outputs of a program that rounds its cache to integer codes
CODES_IDENTICAL = 0.8  # the least fraction of its integer codes that must be identical


def rounds_to_codes(program: Program) -> bool:
    """Whether the program rounds values to integer codes (a quantized cache)."""
    return any(str(n.target).startswith(ROUNDING_OPS) for graph in program_graphs(program.ep) for n in graph.nodes)


def _compare_rounded(want: dict, got: dict) -> dict:
    """A program that rounds to integer codes cannot match another runtime's to 1e-4: a last-bit
    difference in a float (another summation order) moves a value across a rounding boundary,
    the code changes by one step, and the layers after it see that step. It is checked at the
    scale of that step instead: every float output's cosine to the program's at least
    ROUNDED_COSINE, and at least CODES_IDENTICAL of the codes identical."""
    cosines = _cosines(want, got)
    codes = [(torch.as_tensor(np.asarray(got[k])) == ref).double().mean().item() for k, ref in want.items()
             if not ref.is_floating_point() and ref.numel() and k in got and tuple(ref.shape) == got[k].shape]
    lowest, same = min(cosines.values(), default=1.0), min(codes, default=1.0)
    return {"ok": lowest >= ROUNDED_COSINE and same >= CODES_IDENTICAL,
            "rounded": {"min_cosine": lowest, "codes_identical": same}}


def _compare(program: Program, role: str, engine: Engine, inputs: dict[str, torch.Tensor], lossy: bool) -> dict:
    """One run of the engine against its program: `{max_abs, ok}` at the program's precision
    (`passes.manager.tolerance`), judged by cosine when lossy."""
    want = program.run(inputs)
    got = engine.run(inputs, role)
    err, good = max_abs_error(want, {k: torch.from_numpy(np.asarray(v)) for k, v in got.items()}, program.precision)
    if not lossy and not good and rounds_to_codes(program):
        return {"max_abs": err, **_compare_rounded(want, got)}
    if not lossy:
        return {"max_abs": err, "ok": good}
    cosines = _cosines(want, got)
    first = cosines.get(program.output_names[0], 1.0)
    return {"max_abs": err, "ok": first >= LOSSY_FLOOR, f"{program.output_names[0]}_cosine": first,
            "min_cosine": min(cosines.values(), default=1.0)}


def parity(model: Model, engine: Engine, lossy: bool = False) -> dict:
    """Engine against its programs on the example inputs (DESIGN.md tolerance), and again on
    inputs of another shape that the program takes (`Signature.another_shape`: one more row,
    one token fewer), where a toolchain that miscompiles other sizes shows. An engine the backend
    builds lossy on purpose (quantized weights) is measured instead: it passes while its first
    output's (the logits') cosine to the program's stays above LOSSY_FLOOR; the report also
    gives the lowest cosine over every output (a deep layer's cache drifts most)."""
    per_role, worst, ok = {}, 0.0, True
    for role, program in model.programs.items():
        check = per_role[role] = _compare(program, role, engine, program.example_inputs, lossy)
        other = engine.signatures[role].another_shape({k: v.numpy() for k, v in program.example_inputs.items()})
        if other is not None:
            second = _compare(program, role, engine, {k: torch.from_numpy(v) for k, v in other.items()}, lossy)
            check["other_shape"] = {"inputs": {k: list(v.shape) for k, v in other.items()}, **second}
            check["ok"] = check["ok"] and second["ok"]
            worst = max(worst, second["max_abs"])
        worst, ok = max(worst, check["max_abs"]), ok and check["ok"]
    return {"max_abs": worst, "ok": ok, **({"lossy": True} if lossy else {}), "programs": per_role}


def time_side_by_side(first: tuple[Engine, Model], second: tuple[Engine, Model], budget_s: float = 3.0,
                      min_runs: int = 7) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds per program for two engines, runs interleaved so that drift in the
    machine's speed falls on both alike."""
    times = ({}, {})
    for role in first[1].programs:
        feeds = [{k: v.numpy() for k, v in model.programs[role].example_inputs.items()} for _, model in (first, second)]
        engines = (first[0], second[0])
        for engine, feed in zip(engines, feeds):
            engine.run(feed, role)
        samples, start = ([], []), time.perf_counter()
        while len(samples[0]) < min_runs or (time.perf_counter() - start < budget_s and len(samples[0]) < 200):
            for i in (0, 1):
                t = time.perf_counter()
                engines[i].run(feeds[i], role)
                samples[i].append((time.perf_counter() - t) * 1e3)
        for i in (0, 1):
            times[i][role] = float(np.median(samples[i]))
    return times


def memory(model: Model, engine: Engine) -> dict:
    """Weight bytes (shared weights counted once) and KV-cache bytes after the example step."""
    seen, weights = set(), 0
    for program in model.programs.values():
        for name, t in list(program.ep.state_dict.items()) + list(program.ep.constants.items()):
            if isinstance(t, torch.Tensor) and name not in seen:
                seen.add(name)
                weights += t.numel() * t.element_size()
    kv = 0
    role = "decode" if model.is_decoder else None
    if role:
        out = engine.run(model.programs[role].example_inputs, role)
        kv = sum(v.nbytes for k, v in out.items() if k.startswith(("present_", "state_")) or "_scale_" in k)
    return {"weights_bytes": weights, "kv_cache_bytes": kv}


def _measure(original: Model, engine: Engine, optimized: Model, backend: str, options: dict, workdir: Path,
             progress: Progress) -> dict:
    """The optimized engine against the unoptimized one built the same way: a decoder's prefill
    and decode speed at a realistic prompt (`backends.measure`), another model's programs on
    their example inputs."""
    progress("measuring the unoptimized engine against the optimized one")
    base_dir = workdir / "baseline"
    base_dir.mkdir()
    programs = lower_model(original, base_dir, backend, progress, options)
    baseline = Engine(base_dir, {"backend": backend, "backend_options": options, "programs": programs})
    if original.is_decoder:
        vocab = int(next(s for s in original.programs["prefill"].output_specs() if s["name"] == "logits")["shape"][-1])
        speed = measure_decoder(baseline, engine, vocab)
        shutil.rmtree(base_dir)
        return speed
    base_t, opt_t = time_side_by_side((baseline, original), (engine, optimized))
    shutil.rmtree(base_dir)
    total_b, total_o = sum(base_t.values()), sum(opt_t.values())
    return {"baseline_ms": round(total_b, 3), "optimized_ms": round(total_o, 3), "ratio": round(total_b / total_o, 3),
            "programs": {r: {"baseline_ms": round(base_t[r], 3), "optimized_ms": round(opt_t[r], 3),
                             "ratio": round(base_t[r] / opt_t[r], 3)} for r in opt_t}}


def _save_examples(model: Model, folder: Path) -> None:
    arrays = {f"{role}.{name}": t.numpy() for role, p in model.programs.items() for name, t in p.example_inputs.items()}
    np.savez(folder / EXAMPLES, **arrays)


def build_engine(model: Model, original: Model, out: Path, *, backend: str = "onnxruntime",
                 backend_options: dict | None = None, force: bool = False, records=(), fidelity: dict | None = None,
                 measure: bool = False, notes: list[str] | None = None,
                 progress: Progress = lambda m: None) -> tuple[Engine, dict]:
    """Write the engine folder `out` and return the loaded engine and its report."""
    out = Path(out)
    check_destination(out, force)
    check_dtypes(model)
    options = dict(backend_options or {})
    checked_backend(backend, options)
    with atomic_folder(out, replace=force) as tmp:
        programs = lower_model(model, tmp, backend, progress, options, save_programs=True)
        _save_examples(model, tmp)
        for extra in model.extra_files:
            shutil.copy2(extra, tmp / extra.name)
        _write_manifest(tmp, model, backend, options, programs)
        engine = Engine.load(tmp)
        progress("checking the engine against its programs")
        lossy = getattr(backend_module(backend), "lossy", lambda **_: False)(**options)
        check = parity(model, engine, lossy)
        if not check["ok"]:
            raise VerificationError(f"the {backend} engine differs from its program (max abs error {check['max_abs']:.3g})")
        providers = sorted({getattr(r, "provider", None) for r in engine.runners.values()} - {None})
        report = {"version": __version__, "backend": backend, **({"backend_options": options} if options else {}),
                  **({"execution_provider": ", ".join(providers)} if providers else {}),
                  "kind": model.kind,
                  "passes": [r.to_json() for r in records], "parity": check, "fidelity": fidelity or {},
                  "memory": memory(model, engine), "notes": notes or []}
        if measure:
            report["speed"] = _measure(original, engine, model, backend, options, tmp, progress)
        write_reports(tmp, report)
    engine.folder = out  # the folder was moved, not copied: its sessions stay valid
    return engine, report
