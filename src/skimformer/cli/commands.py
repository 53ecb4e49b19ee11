"""The subcommands. Each takes parsed arguments and returns an exit code; errors are raised
(UserError, VerificationError) and mapped to exit codes in `main`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from skimformer import __version__
from skimformer.api import optimize_model
from skimformer.backends.build import check_destination
from skimformer.backends.registry import checked_backend
from skimformer.backends.engine import Engine
from skimformer.backends.generation import Sampling
from skimformer.backends.report import format_table
from skimformer.calibration import calibrate_model, check_options
from skimformer.calibration.data import read_npz
from skimformer.cli.progress import Progress
from skimformer.errors import UserError
from skimformer.ir import analyze, load
from skimformer.passes import all_passes, pipeline_from


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, default=str) + "\n")


BACKEND_FLAGS = {"mlir_dialect": ("mlir", "dialect"), "portable": ("onnxruntime", "portable"),
                 "weights": ("onnxruntime", "weights"), "provider": ("onnxruntime", "provider")}


def _backend_options(args) -> dict:
    """The options of the chosen backend; a flag of another backend is refused."""
    options = {}
    for flag, (backend, option) in BACKEND_FLAGS.items():
        value = getattr(args, flag)
        if value is None or value is False:
            continue
        if args.backend != backend:
            name = "--" + flag.replace("_", "-")
            raise UserError(f"{name} is an option of --backend {backend}, not of {args.backend}: drop it or add --backend {backend}")
        options[option] = value
    return options


def cmd_optimize(args) -> int:
    pipeline = pipeline_from(args.passes, args.config)  # refuse a bad pipeline before any slow work
    options = _backend_options(args)
    checked_backend(args.backend, options)  # a missing optional backend too
    check_destination(Path(args.output), args.force)
    data = read_npz(args.data, "fidelity inputs") if args.data is not None else None
    progress = Progress()
    model = load(args.model)
    progress(f"loaded {args.model} ({model.kind}: {', '.join(model.programs)})")
    engine, report = optimize_model(model, args.output, pipeline, backend=args.backend, backend_options=options,
                                    measure=args.measure,
                                    force=args.force, progress=progress, warn=Progress.warn, data=data)
    if args.json:
        _print_json({"output": str(engine.folder), **report})
    else:
        print(format_table(report))
        print(f"engine written to {engine.folder}")
    return 0


def _structure_text(role: str, s: dict) -> str:
    lines = [f"[{role}] blocks {s['blocks']}, attention sites {s['attention_sites']}, token axis {s['token_axis']}, "
             f"kv-cache inputs {s['kv_cache']['inputs']} outputs {s['kv_cache']['outputs']}, "
             f"heads {', '.join(s['heads']) or 'none'}"]
    for b in s["detail"]["blocks"]:
        lines.append(f"  block {b['index']:3d}  {b['path'] or '(no module)'}  {b['nodes']} nodes  "
                     f"residual {b['input']} -> {b['output']}")
    for a in s["detail"]["attention"][:1]:
        lines.append(f"  attention: {a['kind']}, heads {a['heads']}, kv heads {a['kv_heads']}, head dim {a['head_dim']}")
    if s["skim_ops"]:
        lines.append(f"  skim ops: {', '.join(s['skim_ops'])}")
    for io in ("inputs", "outputs"):
        lines.append(f"  {io}: " + ", ".join(f"{t['name']}{t['shape']}:{t['dtype']}" for t in s[io]))
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    model = load(args.model)
    summaries = {role: analyze(p).summary() for role, p in model.programs.items()}
    if args.json:
        if len(summaries) == 1:
            _print_json(next(iter(summaries.values())))
        else:
            first = next(iter(summaries.values()))
            _print_json({**{k: first[k] for k in ("blocks", "attention_sites", "token_axis", "heads")},
                         "kv_cache": {"inputs": max(s["kv_cache"]["inputs"] for s in summaries.values()),
                                      "outputs": max(s["kv_cache"]["outputs"] for s in summaries.values())},
                         "inputs": first["inputs"], "outputs": first["outputs"], "programs": summaries})
    else:
        for role, s in summaries.items():
            print(_structure_text(role, s))
        if not any(s["attention_sites"] for s in summaries.values()):
            print("no transformer structure found (no attention sites)")
    return 0


def cmd_passes(args) -> int:
    passes = {name: {"lossless": cls.lossless, "summary": cls.summary(), "fields": cls.fields()}
              for name, cls in all_passes().items()}
    if args.json:
        _print_json(passes)
        return 0
    for name, info in passes.items():
        fields = ", ".join(f"{f['name']}={json.dumps(f['default'])}" for f in info["fields"])
        print(f"{name}({fields})  [{'lossless' if info['lossless'] else 'lossy'}]\n    {info['summary']}")
    return 0


def cmd_export(args) -> int:
    from skimformer.zoo.hf_export import export_pretrained

    progress = Progress()
    files = export_pretrained(args.model_dir, args.output, batch=args.batch, seq_len=args.seq_len,
                              static=args.static, force=args.force, progress=progress)
    for f in files:
        print(f)
    return 0


def _read_inputs(path: str, engine: Engine, program: str | None) -> dict:
    try:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read inputs ({e}); give an .npz file with one array per input name") from None
    role = program or engine.roles[0]
    return {k.removeprefix(f"{role}."): v for k, v in arrays.items() if "." not in k or k.startswith(f"{role}.")}


def cmd_run(args) -> int:
    engine = Engine.load(args.engine)
    inputs = _read_inputs(args.inputs, engine, args.program) if args.inputs else engine.example_inputs(args.program)
    outputs = engine.run(inputs, args.program)
    rows = [{"name": k, "shape": list(v.shape), "sum": float(np.asarray(v, dtype=np.float64).sum())} for k, v in outputs.items()]
    if args.json:
        _print_json({"outputs": rows})
    else:
        for r in rows:
            print(f"{r['name']:24s} shape {r['shape']}  sum {r['sum']:.6g}")
    return 0


def _int_list(text: str, option: str, example: str) -> list[int]:
    """Comma-separated integers (`1,2,3`), or a UserError naming the option."""
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers such as {example}; got {text!r}") from None


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids is not None:
        return _int_list(args.prompt_ids, "--prompt-ids", "1,2,3")
    if tokenizer is None:
        raise UserError("this engine folder has no tokenizer files: give --prompt-ids 1,2,3 instead of --prompt")
    return tokenizer(args.prompt)["input_ids"]


def cmd_generate(args) -> int:
    engine = Engine.load(args.engine)
    tokenizer = engine.tokenizer()
    ids = _prompt_ids(args, tokenizer)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    eos = args.eos_token_id if args.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    result = engine.generate_with_stats([ids], args.max_new_tokens, eos_token_id=eos, sampling=sampling)
    generated = result.ids[0].tolist()
    if eos is not None and eos in generated:
        generated = generated[:generated.index(eos) + 1]
    if args.json:
        text = tokenizer.decode(generated, skip_special_tokens=True) if tokenizer is not None else None
        _print_json({"ids": generated, "text": text, "kv_cache_bytes": result.kv_cache_bytes,
                     "tokens_per_s": round(result.tokens_per_s, 3), **result.extra})
    elif tokenizer is not None:
        print(args.prompt if args.prompt is not None else tokenizer.decode(ids), end="")
        print(tokenizer.decode(generated, skip_special_tokens=True))
    else:
        print(",".join(map(str, generated)))
    return 0


def cmd_calibrate(args) -> int:
    at = _int_list(args.at, "--at", "8,16") if args.at is not None else None
    check_options(args.output, args.target_agreement, args.rank, args.criterion, args.steps)  # before slow work
    data = read_npz(args.data) if args.data is not None else None
    progress = Progress()
    result = calibrate_model(load(args.model), data, at, args.output, target_agreement=args.target_agreement,
                             rank=args.rank, criterion=args.criterion, steps=args.steps, seed=args.seed,
                             progress=progress)
    if args.json:
        _print_json(result.summary())
    else:
        print(result.table())
        print(f"exit heads written to {result.output}")
    return 0


def cmd_version(_args) -> int:
    print(f"skimformer {__version__}")
    return 0
