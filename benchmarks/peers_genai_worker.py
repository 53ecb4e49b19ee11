"""onnxruntime-genai side of benchmarks/peers.py, run by the interpreter of its own virtualenv
(`make genai-env`): reads one JSON command per line on stdin, answers one JSON line on stdout.

Commands: {"load": FOLDER, "threads": N}; {"prefill": [[ids]]} -> {"ms"};
{"decode": [[ids]], "steps": K} -> {"tok_s", "tokens"} (the prompt is appended untimed, then K
greedy tokens are timed); {"hold": [[ids]], "steps": K} -> {"ok"} (the prompt is appended and
the generator kept, with room for K more tokens); {"continue": K} -> {"tok_s"} (K greedy tokens
of the held generator, timed: decode speed after a long prompt without a prefill per round);
{"release": true} -> {"ok"} (the held generator and its cache are freed).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime_genai as og

model = None
held = None


def set_threads(folder: Path, threads: int) -> None:
    config_path = folder / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"], options["inter_op_num_threads"] = threads, 1
    config_path.write_text(json.dumps(config, indent=2))


def generator(ids: np.ndarray, steps: int):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + steps, do_sample=False, batch_size=ids.shape[0])
    gen = og.Generator(model, params)
    return gen


def timed_steps(gen, steps: int) -> tuple[float, list]:
    tokens, start = [], time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
        tokens.append(gen.get_next_tokens().tolist())
    return time.perf_counter() - start, tokens


def answer(command: dict) -> dict:
    global model, held
    if "load" in command:
        set_threads(Path(command["load"]), command["threads"])
        model = og.Model(command["load"])
        return {"ok": True}
    if "continue" in command:
        seconds, tokens = timed_steps(held, command["continue"])
        return {"tok_s": len(tokens[0]) * len(tokens) / seconds}
    held = None  # a new prompt, or a release: free the held generator's cache first
    if "release" in command:
        return {"ok": True}
    ids = np.asarray(next(command[k] for k in ("prefill", "decode", "generate", "hold") if k in command), dtype=np.int32)
    steps = command.get("steps", 1)
    gen = generator(ids, steps)
    start = time.perf_counter()
    gen.append_tokens(ids)
    prefill_ms = (time.perf_counter() - start) * 1e3
    if "prefill" in command:
        return {"ms": prefill_ms}
    if "hold" in command:
        held = gen
        return {"ok": True}
    seconds, tokens = timed_steps(gen, steps)
    return {"tok_s": ids.shape[0] * steps / seconds, "tokens": np.array(tokens).T.tolist()}


for line in sys.stdin:
    try:
        reply = answer(json.loads(line))
    except Exception as e:  # the parent prints the failure as the row's note
        reply = {"error": f"{type(e).__name__}: {e}"[:300]}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()
