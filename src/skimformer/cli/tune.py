"""`skimformer tune MODEL --budget "cosine>=0.99" -o tuned/`: search passes for the fastest engine
within a fidelity budget (`skimformer.tuning`). A module of its own: its options are many, and
Optuna and Ray load only when it runs."""
from __future__ import annotations

import argparse
import json
import sys

from skimformer.calibration.data import read_npz
from skimformer.cli.progress import Progress

EPILOG = """budgets: cosine>=X, agreement>=X, top1-drop<=P (points; --data has labels), ppl-ratio<=X (decoders);
several comma-separated or --budget repeated; the first is the fidelity axis of the front.
outputs in -o: trials.jsonl (one line per trial; the same command resumes), best.yaml (optimize --config),
trials.png, summary.json, engine/ (the chosen engine; the unoptimized one when nothing within the budget is faster)."""


def add_parser(sub) -> None:
    from skimformer.backends import BACKENDS
    from skimformer.tuning.space import GROUPS

    p = sub.add_parser("tune", help="search passes for the fastest engine within a fidelity budget", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a .pt2 file or a decoder folder")
    p.add_argument("--budget", action="append", required=True, help='fidelity to keep, e.g. "cosine>=0.99"')
    p.add_argument("-o", "--output", required=True, help="folder for the search and its engine (resumed if it holds "
                                                          "the same search; --force starts over)")
    p.add_argument("--data", help=".npz with one array per program input, rows first, and optionally labels "
                                  "(required for encoders; a decoder's default: the shipped texts); a quarter is held out")
    p.add_argument("--space", help=f"comma-separated groups of {', '.join(GROUPS)} (default: those that apply)")
    p.add_argument("--trials", type=int, help="trials in all, resumed ones included (default 40 without --time)")
    p.add_argument("--time", help="search time limit: 90s, 20m, 1h (trials in flight finish)")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="engine to build (default: onnxruntime)")
    p.add_argument("--ray", metavar="auto|ADDRESS",
                   help="run trials on Ray workers: auto starts a local cluster; ADDRESS joins a running one")
    p.add_argument("--workers", type=int, help="with --ray: worker processes (default: the cluster's CPUs / --threads)")
    p.add_argument("--threads", type=int, help="threads per worker (default: all cores; 1 with --ray)")
    p.add_argument("--batch", type=int, default=8, help="rows per timed call (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler and of the held-out split (default 0)")
    p.add_argument("--force", action="store_true", help="replace the output folder, starting a new search")
    p.add_argument("--json", action="store_true", help="print summary.json as one JSON object")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    from skimformer.tuning import parse_budgets, parse_duration, tune_model

    budgets = parse_budgets(args.budget)  # refuse bad input before any slow work
    time_limit = parse_duration(args.time) if args.time is not None else None
    data = read_npz(args.data, "tune inputs") if args.data is not None else None
    progress = Progress()
    result = tune_model(args.model, budgets, args.output, data=data, space=args.space, trials=args.trials,
                        time_limit=time_limit, backend=args.backend, ray=args.ray, workers=args.workers,
                        threads=args.threads, batch=args.batch, seed=args.seed, force=args.force,
                        verbose=args.verbose, progress=progress, warn=Progress.warn)
    if args.json:
        sys.stdout.write(json.dumps(result.summary, default=float) + "\n")
    else:
        print(result.text())
    return 0
