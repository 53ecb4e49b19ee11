"""What a search leaves: the choice, the Pareto front as a table, a plot, and `best.yaml`.

The choice is the fastest measured trial within every budget, provided it beats the unoptimized
engine by more than timing noise (the 90% lower bound of its speed ratio is above 1); otherwise
the answer is that nothing within the budget helps, and the engine built is the unoptimized one.
The front holds the measured trials that no other trial beats on both speed and the primary
metric, the unoptimized engine (1.00x, exact) among the points; the plot shows every measured trial, the front and the budget's bound.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from skimformer.atomic import atomic_file
from skimformer.passes.spec import parse_text
from skimformer.tuning.budget import Budget

EXACT = {"cosine": 1.0, "agreement": 1.0, "top1-drop": 0.0, "ppl-ratio": 1.0}  # the unoptimized engine's figures


def choose(records: list[dict]) -> dict | None:
    """The fastest trial within budget that is faster than the unoptimized engine beyond timing
    noise, or None."""
    within = [r for r in records if r["state"] == "complete" and r["within_budget"] and faster(r)]
    return max(within, key=lambda r: r["speed"], default=None)


def faster(measured: dict) -> bool:
    """Whether a trial, or the chosen engine timed again, beats the unoptimized engine beyond timing noise."""
    return measured["speed_bound"] > 1.0


def speed_text(measured: dict, key: str = "speed") -> str:
    """A speed with its bound: `1.26x (90% bound 1.10)`."""
    return f"{measured[key]:.2f}x (90% bound {measured[key + '_bound']:.2f})"


def fastest_within(records: list[dict]) -> dict | None:
    return max((r for r in records if r["state"] == "complete" and r["within_budget"]),
               key=lambda r: r["speed"], default=None)


def _better(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether point a dominates point b (both objectives as 'higher is better')."""
    return a[0] >= b[0] and a[1] >= b[1] and a != b


def pareto_front(records: list[dict], primary: Budget) -> list[dict]:
    """Measured trials and the unoptimized engine (trial None) not dominated on (speed, primary)."""
    sign = 1 if primary.floor else -1
    points = [(r, (r["speed"], sign * r["figures"][primary.metric])) for r in records if r["state"] == "complete"]
    points.append((unoptimized(), (1.0, sign * EXACT[primary.metric])))
    front = [r for r, p in points if not any(_better(q, p) for _, q in points)]
    return sorted(front, key=lambda r: r["speed"])


def unoptimized() -> dict:
    return {"trial": None, "state": "complete", "label": "unoptimized", "pipeline": "", "weights": None,
            "speed": 1.0, "figures": dict(EXACT), "within_budget": True}


def table(rows: list[dict], budgets: list[Budget]) -> str:
    """A text table of trials: trial, speed, each budget's figure, within budget, estimate, pipeline."""
    header = ["trial", "speed", *(b.metric for b in budgets), "budget", "work", "pipeline"]
    lines = [header]
    for r in rows:
        figures = r.get("figures") or {}
        lines.append(["-" if r["trial"] is None else str(r["trial"]), f"{r['speed']:.2f}x",
                      *(f"{figures[b.metric]:.4g}" if b.metric in figures else "" for b in budgets),
                      "ok" if r.get("within_budget") else "out",
                      "" if r.get("estimate") is None else f"{r['estimate']:.2f}", r["label"]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def write_best(path: Path, chosen: dict | None, model: str, budgets: list[Budget], backend: str) -> None:
    """`best.yaml`: the chosen pipeline as `optimize --config` reads it (`passes: []` when nothing
    helps); the backend's weight format, which is an option of optimize and not a pass, is given
    in the command of the header."""
    steps = parse_text(chosen["pipeline"]) if chosen else []
    passes = [name if not fields else {name: fields} for name, fields in steps]
    weights = f" --weights {chosen['weights']}" if chosen and chosen["weights"] else ""
    figures = "" if chosen is None else (f" ({chosen['speed']:.2f}x, "
                                         + ", ".join(f"{b.metric} {chosen['figures'][b.metric]:.4g}" for b in budgets) + ")")
    header = (f"# skimformer tune {model} --budget \"{','.join(map(str, budgets))}\": "
              f"{'trial ' + str(chosen['trial']) + figures if chosen else 'nothing within the budget is faster; no passes'}\n"
              f"# optimize {model} --config best.yaml --backend {backend}{weights} -o engine/\n")
    with atomic_file(path) as tmp:
        tmp.write_text(header + yaml.safe_dump({"passes": passes}, sort_keys=False))


def plot(path: Path, records: list[dict], front: list[dict], budgets: list[Budget], chosen: dict | None) -> str | None:
    """A PNG of every measured trial (speed against the primary metric), the front, the primary
    budget's bound and the unoptimized engine; returns why it was not drawn, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed (pip install 'skimformer[tune]'): no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = budgets[0]
    done = [r for r in records if r["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for within, color, label in ((True, "tab:blue", "within budget"), (False, "tab:gray", "outside budget")):
        pts = [r for r in done if r["within_budget"] == within]
        ax.scatter([r["figures"][primary.metric] for r in pts], [r["speed"] for r in pts], c=color, s=22, label=label)
    ax.plot([r["figures"][primary.metric] for r in front], [r["speed"] for r in front], "-", c="tab:orange",
            label="Pareto front")
    ax.scatter([EXACT[primary.metric]], [1.0], marker="s", c="black", s=30, label="unoptimized")
    if chosen is not None:
        ax.scatter([chosen["figures"][primary.metric]], [chosen["speed"]], marker="*", c="tab:red", s=160,
                   label=f"chosen (trial {chosen['trial']})")
    ax.axvline(primary.bound, ls="--", c="tab:red", lw=1, label=f"budget {primary}")
    ax.axhline(1.0, ls=":", c="black", lw=0.8)
    ax.set_xlabel(f"{primary.metric} (against the unoptimized engine)")
    ax.set_ylabel("speed (x the unoptimized engine)")
    ax.set_title(f"skimformer tune: {len(done)} measured trials of {len(records)}")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return None
