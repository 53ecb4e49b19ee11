"""Decoder engines against ONNX Runtime's own LLM path (onnxruntime-genai), side by side.

`make bench-peers`: genai's model builder runs on the same fp32 SmolLM2-135M folder (fp32 and
int4 weights) in its own virtualenv (`make genai-env`), driven as a worker process; skimformer's
engines run here. Every engine uses the same thread count. Figures: prefill time at one prompt length,
decode tokens/s after prompts of several lengths and batch sizes, and each system's greedy
tokens against genai fp32's over `--agree` tokens of a real prompt. Compressed caches also
print, for each decode column, their bytes ceiling: (weights + full KV bytes) / (weights +
compressed KV bytes), the decode speed-up if decoding only streamed bytes, and the share of it
reached by their decode speed against the same weights with a full cache (`none`, or `int4`).

Decode speed: each system takes the prompt once and keeps its cache, takes one step (all of this
untimed); then `--steps` greedy steps are timed `--repeats` times, the median reported. genai always prefills the real
prompt. skimformer prefills it up to 2,000 tokens (at batch > 1, its first row, repeated); at
longer contexts its cache is synthesized from its own prefills of 1,000 and 2,000 tokens
(`common.grown`: what grows, grows on; a full window stays), rows repeated: decode speed does
not depend on the cache's content, and eight 8,000-token prefills a system would take most of
an hour here.
Systems take turns round-robin (machine drift falls on each alike) while their caches are
small (batch x context <= 4,000 tokens); beyond, one system at a time is loaded and holds its
cache (ten caches of 8 x 8,000 tokens do not fit in memory, nor genai's prefill of them beside
other engines: it computes logits for all 64,000 prompt tokens, 12.6 GB, and takes a batched
prompt in one piece), so those columns are in turn, not interleaved. The table is printed
after every column, so that a run cut short keeps what it measured.

    python benchmarks/peers.py [--contexts 128,2000] [--batches 1] [--prefill 2000] [--steps 16]
        [--repeats 3] [--agree 128] [--systems none,portable,int4,genai-fp32,genai-int4,...]
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import THREADS, grown, print_table, setup_threads  # noqa: E402

from skimformer.backends.engine import Engine  # noqa: E402
from skimformer.backends.generation import CopiedCache  # noqa: E402
from skimformer.ir.signature import carried_input  # noqa: E402

CACHE = ROOT / ".cache" / "bench-peers"
GENAI_PY = ROOT / ".cache" / "genai-venv" / "bin" / "python"
# skimformer systems: name -> (passes, backend options)
SKIM = {"none": ("", {}), "portable": ("", {"portable": True}), "int4": ("", {"weights": "int4"}),
        "kv-quant8": ("kv-quant(scheme=channel, bits=8)", {}), "kv-quant4": ("kv-quant(scheme=channel, bits=4)", {}),
        "kv-window512": ("kv-window(window=512)", {}), "snapkv0.5": ("kv-evict(policy=snapkv, keep=0.5)", {}),
        "prompt-prune0.5": ("prompt-prune(keep=0.5)", {}),
        "int4+kv-quant8": ("kv-quant(scheme=channel, bits=8)", {"weights": "int4"})}
GENAI = {"genai-fp32": "fp32", "genai-int4": "int4"}
REAL_PREFILL = 2000  # the longest prompt skimformer's engines prefill at batch 1; beyond it, or batched, synthesized
PROBES = (1000, 2000)  # the prefills a synthesized cache grows from
INTERLEAVED = 4000  # batch x context up to which all systems hold their caches at once and take turns


def progress(msg: str) -> None:
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def smollm2_export() -> Path:
    from skimformer.zoo import real

    out = CACHE / "smollm2-export"
    if not (out / "decode.pt2").exists():
        progress("exporting SmolLM2-135M (fp32)")
        real.export_smollm2(out)
    return out


def skim_engine(name: str) -> Engine:
    from skimformer import optimize

    out = CACHE / f"skim-{name}"
    if not (out / "manifest.json").exists():
        passes, options = SKIM[name]
        progress(f"building skimformer {name} ({passes or 'no passes'}, {options or 'default'})")
        start = time.perf_counter()
        optimize(smollm2_export(), passes or None, output=out, backend_options=options, force=True)
        progress(f"built {name} in {time.perf_counter() - start:.0f} s")
    return Engine.load(out)


class GenaiWorker:
    """One genai model in a worker process of the genai virtualenv."""

    def __init__(self, precision: str):
        from skimformer.zoo import real

        folder = CACHE / f"genai-{precision}"
        if not (folder / "genai_config.json").exists():
            progress(f"running genai's model builder ({precision})")
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([str(GENAI_PY), "-m", "onnxruntime_genai.models.builder", "-i", str(real.smollm2_dir()),
                            "-o", str(folder), "-p", precision, "-e", "cpu", "-c", str(CACHE / "genai-hf-cache")],
                           check=True, stdout=subprocess.DEVNULL)
        self.proc = subprocess.Popen([str(GENAI_PY), str(ROOT / "benchmarks" / "peers_genai_worker.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask({"load": str(folder), "threads": THREADS})

    def ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply


class _Synthesized:
    """A prefill runner that returns a synthesized prefill's outputs (its cache, mask and logits)."""

    def __init__(self, outputs: dict):
        self.outputs = outputs

    def run(self, feeds: dict) -> dict:
        return self.outputs


class SkimSystem:
    def __init__(self, name: str):
        self.name, self._engine = name, skim_engine(name)
        self.probes = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = skim_engine(self.name)
        return self._engine

    def unload(self) -> None:
        """Free the engine's sessions and what their arenas hold (loaded again when used); the
        engine's objects refer to each other, so only a collection frees them."""
        self._engine = None
        gc.collect()

    def _session(self, steps: int, prefill=None):
        make = getattr(self.engine.backend, "decoding_cache", None)
        prefill = prefill or self.engine.runners["prefill"]
        cache = make(prefill, self.engine.runners["decode"], steps) if make else None
        if cache:
            return cache
        return CopiedCache(lambda feeds, role: prefill.run(feeds) if role == "prefill" else self.engine.run(feeds, role))

    def prefill_ms(self, ids: np.ndarray) -> float:
        start = time.perf_counter()
        self._session(1).step(_prompt_feeds(ids), "prefill")
        return (time.perf_counter() - start) * 1e3

    def hold(self, ids: np.ndarray, steps: int) -> None:
        """Take the prompt `ids` (its cache synthesized past a real prefill's reach) into a
        session with room for `steps` more tokens."""
        rows, n = ids.shape
        synthesized = None if rows == 1 and n <= REAL_PREFILL else _Synthesized(self._synthesized(ids))
        self.cache = self._session(steps + 1, synthesized)
        self.out = self.cache.step(_prompt_feeds(ids), "prefill")
        self.kv_bytes = sum(v.nbytes for k, v in self.out.items() if k.startswith("present_"))
        self.mask = np.asarray(self.out.get("attention_mask", np.ones_like(ids)), dtype=np.int64)
        self.position = n

    def resume(self, steps: int) -> float:
        """Tokens/s of `steps` greedy steps of the held session."""
        rows, tokens = self.mask.shape[0], []
        out, mask, start = self.out, self.mask, time.perf_counter()
        for _ in range(steps):
            token = out["logits"][:, -1].argmax(-1)
            tokens.append(token)
            if "attention_mask" in out:
                mask = np.asarray(out["attention_mask"], dtype=np.int64)
            mask = np.concatenate([mask, np.ones((rows, 1), dtype=np.int64)], axis=1)
            out = self.cache.step({"input_ids": token[:, None], "attention_mask": mask,
                                   "position_ids": np.full((rows, 1), self.position)}, "decode")
            self.position += 1
        self.out, self.mask, self.tokens = out, mask, np.stack(tokens, 1)
        return rows * steps / (time.perf_counter() - start)

    def release(self) -> None:
        self.cache = self.out = None

    def decode(self, ids: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
        self.hold(ids, steps)
        speed = self.resume(steps)
        self.release()
        return speed, self.tokens

    def _synthesized(self, ids: np.ndarray) -> dict:
        """The prefill outputs of the prompt `ids`: its first row's real prefill up to
        REAL_PREFILL tokens, else grown from PROBES prefills; rows repeated."""
        rows, n = ids.shape
        if n <= REAL_PREFILL:
            prefills, lengths = [_last_logits(self.engine.run(_prompt_feeds(ids[:1])))], (n,)
        else:
            if self.probes is None:  # kept without their logits but the last row's (400 MB each)
                self.probes = [_last_logits(self.engine.run(_prompt_feeds(text_ids(length, 1)))) for length in PROBES]
            prefills, lengths = self.probes, PROBES
        carried = [k for k in prefills[0] if carried_input(k) or k == "attention_mask"]
        out = {k: prefills[0][k] for k in carried} if len(prefills) == 1 else \
            grown({k: [p[k] for p in prefills] for k in carried}, lengths, n)
        out["logits"] = prefills[-1]["logits"]
        return {k: np.repeat(v, rows, axis=0) for k, v in out.items()}

    def weight_bytes(self) -> int:
        """Bytes a decode step streams besides the cache: its engine file and weights."""
        return sum(f.stat().st_size for f in (CACHE / f"skim-{self.name}").glob("decode.onnx*"))

    def uncompressed(self) -> str:
        """The system with this one's weights and a full-precision cache."""
        return "int4" if SKIM[self.name][1].get("weights") == "int4" else "none"


class GenaiSystem:
    def __init__(self, name: str):
        self.precision, self._worker = GENAI[name], None

    @property
    def worker(self) -> GenaiWorker:
        if self._worker is None:
            self._worker = GenaiWorker(self.precision)
        return self._worker

    def unload(self) -> None:
        """End the worker process, and with it all it holds (started again when used)."""
        if self._worker is not None:
            with contextlib.suppress(BrokenPipeError):  # a worker that died
                self._worker.proc.stdin.close()
            self._worker.proc.wait()
            self._worker = None

    def prefill_ms(self, ids: np.ndarray) -> float:
        return self.worker.ask({"prefill": ids.tolist()})["ms"]

    def hold(self, ids: np.ndarray, steps: int) -> None:
        self.worker.ask({"hold": ids.tolist(), "steps": steps})

    def resume(self, steps: int) -> float:
        return self.worker.ask({"continue": steps})["tok_s"]

    def release(self) -> None:
        self.worker.ask({"release": True})

    def decode(self, ids: np.ndarray, steps: int) -> tuple[float, np.ndarray]:
        reply = self.worker.ask({"decode": ids.tolist(), "steps": steps})
        return reply["tok_s"], np.asarray(reply["tokens"])


def _last_logits(outputs: dict) -> dict:
    return {**outputs, "logits": outputs["logits"][:, -1:].copy()}


def _prompt_feeds(ids: np.ndarray) -> dict:
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}


@functools.cache
def _tokenizer():
    from skimformer.zoo import real

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real.smollm2_dir(), local_files_only=True)


def text_ids(tokens: int, batch: int) -> np.ndarray:
    """`batch` rows of `tokens` real-text token ids (passages of the shipped texts, the model's tokenizer)."""
    from skimformer.zoo import texts

    tok = _tokenizer()
    rows = [tok(texts.passage(tokens, row, tok))["input_ids"][:tokens] for row in range(batch)]
    return np.array(rows, dtype=np.int64)


def rounds(systems: dict, measure, repeats: int) -> dict[str, float]:
    """Median of `measure(system)` per system over `repeats` round-robin rounds."""
    samples = {name: [] for name in systems}
    for _ in range(repeats):
        for name, system in systems.items():
            samples[name].append(measure(system))
    return {name: statistics.median(v) for name, v in samples.items()}


def decode_speeds(systems: dict, ids: np.ndarray, steps: int, repeats: int) -> dict[str, float]:
    """Median tokens/s of `repeats` runs of `steps` steps after the prompt `ids`, per system:
    round-robin with every cache held at once while they are small, else one system at a time."""
    if ids.size <= INTERLEAVED:
        for system in systems.values():
            _warm(system, ids, steps * repeats)
        speed = rounds(systems, lambda s: s.resume(steps), repeats)
        for system in systems.values():
            system.release()
        return speed
    for system in systems.values():
        system.unload()
    speed = {}
    for name, system in systems.items():
        progress(f"  {name}")
        try:
            _warm(system, ids, steps * repeats)
            speed[name] = statistics.median(system.resume(steps) for _ in range(repeats))
            system.release()
        except (RuntimeError, ValueError, OSError) as e:  # a genai worker out of memory ends its pipe
            progress(f"  {name} failed: {type(e).__name__}: {e}"[:200])
        system.unload()
    return speed


def _warm(system, ids: np.ndarray, steps: int) -> None:
    """Hold the prompt with room for `steps` timed steps after one untimed step: a session's
    first run at new sizes plans its memory."""
    system.hold(ids, steps + 1)
    system.resume(1)


def _ceilings(systems: dict, speed: dict, rows: dict, column: str) -> str:
    """For each compressed cache: its bytes ceiling, (weights + full cache bytes) / (weights +
    compressed cache bytes) after the prompt just timed, and the share of it that its decode
    speed against the same weights with a full cache reached."""
    skim = {n: s for n, s in systems.items() if isinstance(s, SkimSystem) and n in speed}  # measured in this column
    full = next((skim[n].kv_bytes for n in ("none", "int4", "portable") if n in skim), None)
    compressed = {n: s for n, s in skim.items() if n not in ("none", "portable", "int4")}
    if full is None or not compressed:
        return column
    for name, system in compressed.items():
        weights = system.weight_bytes()
        ceiling = (weights + full) / (weights + system.kv_bytes)
        reference = system.uncompressed()
        reached = f", reached {speed[name] / speed[reference] / ceiling:.2f}" if reference in speed else ""
        rows[name][column] = f"{ceiling:.2f}{reached}"
    return column


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--systems", default="none,portable,int4,genai-fp32,genai-int4")
    ap.add_argument("--contexts", default="128,2000")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--prefill", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--agree", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    setup_threads()
    names = args.systems.split(",")
    if any(n in GENAI for n in names) and not GENAI_PY.exists():
        progress("genai is not set up (make genai-env): its columns are left out")
        names = [n for n in names if n not in GENAI]
    systems = {n: (GenaiSystem(n) if n in GENAI else SkimSystem(n)) for n in names}
    base = "genai-fp32" if "genai-fp32" in systems else names[0]
    rows = {n: {"system": n} for n in names}
    start = time.perf_counter()

    ids = text_ids(args.prefill, 1)
    progress(f"prefill of {args.prefill} tokens")
    for name, ms in rounds(systems, lambda s: s.prefill_ms(ids), args.repeats).items():
        rows[name][f"prefill {args.prefill} ms"] = f"{ms:.0f}"
    columns = ["system", f"prefill {args.prefill} ms"]
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            ids = text_ids(context, batch)
            progress(f"decode after {context} tokens, batch {batch}")
            speed = decode_speeds(systems, ids, args.steps, args.repeats)
            column = f"tok/s b{batch} @{context}"
            columns.append(column)
            for name in systems:
                rows[name][column] = f"{speed[name]:.1f} ({speed[name] / speed[base]:.2f}x)" if name in speed and \
                    base in speed else f"{speed[name]:.1f}" if name in speed else "failed (see log)"
            columns.append(_ceilings(systems, speed, rows, f"ceiling b{batch} @{context}"))
            print_table(list(rows.values()), columns)
            sys.stdout.flush()
    progress(f"greedy agreement with {base} over {args.agree} tokens")
    ids = text_ids(256, 1)
    reference = systems[base].decode(ids, args.agree)[1]
    for name, system in systems.items():
        tokens = system.decode(ids, args.agree)[1]
        rows[name][f"agreement with {base}"] = f"{(tokens == reference).mean():.3f}"
    columns.append(f"agreement with {base}")
    print(f"\nSmolLM2-135M, {THREADS} threads, round-robin medians of {args.repeats}; decode: {args.steps} greedy steps "
          f"after a real-text prompt; ratios against {base}  [{time.perf_counter() - start:.0f} s]")
    print_table(list(rows.values()), columns)


if __name__ == "__main__":
    main()
