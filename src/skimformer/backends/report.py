"""report.json and report.md of an engine folder, and the table the CLI prints at the end."""
from __future__ import annotations

import json
from pathlib import Path


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _measured_on(on: dict) -> str:
    """`fidelity.measured_on` in words."""
    if "prompt_tokens" in on:
        return (f"{on['rows']} rows: {on['prompt_tokens']}-token prompts, then {on['decode_steps']} teacher-forced "
                f"decode steps ({on['inputs']})")
    return f"{on['rows']} rows of {on['tokens']} tokens ({on['inputs']})"


def _fidelity_rows(fidelity: dict) -> list[tuple[str, str]]:
    """Figures, what they were measured on, and whether each lossy pass acted on it."""
    rows = [(f"fidelity {key}", f"{value:.4f}") for key, value in fidelity.items() if isinstance(value, float)]
    if "measured_on" in fidelity:
        rows.append(("fidelity measured on", _measured_on(fidelity["measured_on"])))
    rows += [(f"fidelity {name}", status) for name, status in fidelity.get("exercised", {}).items()]
    return rows


def table_rows(report: dict) -> list[tuple[str, str]]:
    rows = [("backend", report["backend"]), ("model", report.get("kind", ""))]
    for p in report["passes"]:
        kind = "lossless" if p["lossless"] else "lossy"
        rows.append((f"pass {p['name']}", f"{kind}, matched {p['matched']}" + ("" if p["matched"] else " (nothing to rewrite)")))
    if not report["passes"]:
        rows.append(("passes", "none"))
    parity = report["parity"]
    rows.append(("parity vs program", f"max abs {parity['max_abs']:.2e} ({'ok' if parity['ok'] else 'FAILED'})"))
    rows += _fidelity_rows(report.get("fidelity", {}))
    mem = report["memory"]
    rows.append(("weights", _mb(mem["weights_bytes"])))
    if mem.get("kv_cache_bytes"):
        rows.append(("kv cache (example step)", _mb(mem["kv_cache_bytes"])))
    if "speed" in report:
        s = report["speed"]
        if "decode" in s:  # a decoder: prefill and decode at a realistic prompt
            p, d = s["prefill"], s["decode"]
            rows.append(("prefill speed", f"{p['prompt_tokens']} tokens: {p['baseline_ms']:.0f} ms -> "
                                          f"{p['optimized_ms']:.0f} ms ({p['ratio']:.2f}x)"))
            rows.append(("decode speed", f"at {d['context_tokens']} tokens: {d['baseline_tokens_per_s']:.1f} -> "
                                         f"{d['optimized_tokens_per_s']:.1f} tok/s ({d['ratio']:.2f}x)"))
        else:
            rows.append(("speed", f"{s['baseline_ms']:.2f} ms -> {s['optimized_ms']:.2f} ms ({s['ratio']:.2f}x)"))
    for note in report.get("notes", []):
        rows.append(("note", note))
    return rows


def format_table(report: dict) -> str:
    rows = table_rows(report)
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _markdown(report: dict) -> str:
    lines = [f"# skimformer report ({report['backend']})", "", "| what | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in table_rows(report)]
    for p in report["passes"]:
        lines += ["", f"## {p['name']}", "", "```json", json.dumps(p["report"], indent=2, default=str), "```"]
    return "\n".join(lines) + "\n"


def write_reports(folder: Path, report: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (folder / "report.md").write_text(_markdown(report))
