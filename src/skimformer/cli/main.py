"""Command-line entry points: `skimformer SUBCOMMAND ...` and `optimize ...`.

Exit codes (DESIGN.md): 0 done; 2 bad input or refused request, one line on stderr; 1 an
internal error or failed parity, with a hint to report it. Stderr carries skimformer's progress,
warnings and errors; the libraries' own warnings, logs and progress bars only with --verbose.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import traceback
import warnings

from skimformer import __version__
from skimformer.errors import UserError, VerificationError, cause, one_line

BUG_HINT = "this is a skimformer bug: please report it with the command line and the model (set SKIMFORMER_DEBUG=1 for a traceback)"
LIBRARY_LOGGERS = ("torch", "transformers", "onnxscript", "onnx_ir", "huggingface_hub")
# Read when transformers and huggingface_hub are first imported, which the commands do lazily.
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
VERBOSE_HELP = "also show the libraries' warnings, logs and progress bars (torch, transformers, onnxscript)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str):
        print(f"error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_optimize_args(p: argparse.ArgumentParser) -> None:
    from skimformer.backends import BACKENDS
    from skimformer.backends.mlir_dialects import MLIR_DIALECTS

    p.add_argument("model", help="a .pt2 file from torch.export.save, or a decoder folder (prefill.pt2 + decode.pt2)")
    p.add_argument("-o", "--output", required=True, help="engine folder to write (refused if it exists, unless --force)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--passes", help='pipeline, e.g. "canonicalize-attention; tome(r=8)"')
    group.add_argument("--config", help="pipeline as a YAML file (a list under 'passes:')")
    p.add_argument("--backend", default="onnxruntime", choices=BACKENDS, help="engine to build (default: onnxruntime)")
    p.add_argument("--mlir-dialect", choices=MLIR_DIALECTS,
                   help="with --backend mlir: the MLIR dialect of the written text (default: linalg-on-tensors)")
    p.add_argument("--portable", action="store_true",
                   help="with --backend onnxruntime: standard ONNX ops only, no fused contrib kernels (for runtimes without them)")
    p.add_argument("--weights", choices=("int8", "int4"),
                   help="with --backend onnxruntime: quantize matmul weights (MatMulNBits, lossy: the report gives fidelity)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"),
                   help="with --backend onnxruntime: the execution provider engines run on (default auto: CUDA when "
                        "onnxruntime-gpu is installed, else CPU); the report says which ran")
    p.add_argument("--measure", action="store_true", help="also time the engine against the unoptimized engine")
    p.add_argument("--data", help="fidelity inputs: .npz with one array per program input, rows first (default: a "
                                  "decoder's prompts from the shipped texts, sized so every lossy pass acts; an "
                                  "encoder's example inputs)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def build_parser() -> argparse.ArgumentParser:
    from skimformer.calibration import CRITERION, RANK, STEPS, TARGET_AGREEMENT
    from skimformer.cli import commands as c, tune

    parser = _Parser(prog="skimformer", description="A compiler for transformer inference.")
    parser.add_argument("--version", action="version", version=f"skimformer {__version__}")
    parser.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("optimize", help="rewrite a model with passes and build an engine")
    _add_optimize_args(p)
    p.set_defaults(func=c.cmd_optimize)

    p = sub.add_parser("inspect", help="print a model's transformer structure")
    p.add_argument("model", help="a .pt2 file or a decoder folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=c.cmd_inspect)

    p = sub.add_parser("passes", help="list the registered passes and their fields")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_passes)

    p = sub.add_parser("export", help="export a transformers model folder to .pt2 programs")
    p.add_argument("model_dir", help="a folder with config.json (and weights; none gives random weights)")
    p.add_argument("-o", "--output", required=True, help="folder to write model.pt2, or prefill.pt2 + decode.pt2")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example inputs (default 2)")
    p.add_argument("--seq-len", type=int, default=16, help="tokens in the example inputs (default 16)")
    p.add_argument("--static", action="store_true", help="fix batch and sequence length instead of keeping them dynamic")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=c.cmd_export)

    p = sub.add_parser("run", help="run an engine folder on inputs and print output shapes and checksums")
    p.add_argument("engine", help="an engine folder written by optimize")
    p.add_argument("--inputs", help=".npz with one array per input name (default: the stored example inputs)")
    p.add_argument("--program", help="which program of a decoder engine to run (default: the first)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.cmd_run)

    p = sub.add_parser("generate", help="generate text with a decoder engine (prefill, then decode steps)")
    p.add_argument("engine", help="a decoder engine folder written by optimize")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the model's tokenizer files in the engine folder)")
    prompt.add_argument("--prompt-ids", help="prompt token ids, comma-separated: 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample within this probability mass (nucleus)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--eos-token-id", type=int, help="stop at this token (default: the tokenizer's end-of-sequence)")
    p.add_argument("--json", action="store_true",
                   help="print one object: ids (prompt excluded), text, kv_cache_bytes, tokens_per_s")
    p.set_defaults(func=c.cmd_generate)

    p = sub.add_parser("calibrate", help="train exit adapters (backbone frozen) and choose early-exit thresholds")
    p.add_argument("model", help="a .pt2 file or a decoder folder")
    p.add_argument("--data", help=".npz with one array per program input, rows first "
                                  "(required for encoders; decoders default to the shipped texts)")
    p.add_argument("-o", "--output", required=True, help="exit-heads file to write (heads.safetensors)")
    p.add_argument("--at", help="blocks to exit after, 0-based, comma-separated: 8,16 "
                                "(default: at 1/4, 1/2, 3/4 of the depth)")
    p.add_argument("--target-agreement", type=float, default=TARGET_AGREEMENT,
                   help=f"top-1 agreement with the full model each exit must keep (default {TARGET_AGREEMENT})")
    p.add_argument("--rank", type=int, default=RANK, help=f"rank of each exit adapter (default {RANK})")
    p.add_argument("--criterion", default=CRITERION,
                   help=f"confidence: max-prob, margin or entropy (default {CRITERION})")
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"Adam steps per exit (default {STEPS}; 0 only picks thresholds)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=c.cmd_calibrate)
    tune.add_parser(sub)
    for p in sub.choices.values():  # also after the subcommand; SUPPRESS keeps a --verbose given before it
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


@contextlib.contextmanager
def libraries_quiet(verbose: bool):
    """Keep the libraries' warnings (torch's deprecations, transformers' FutureWarnings), logs and
    progress bars off the terminal for the block, unless `verbose`: skimformer reports what matters
    itself (Progress), and the rest buries it. Everything is restored after the block."""
    if verbose:
        yield
        return
    loggers = {name: logging.getLogger(name) for name in LIBRARY_LOGGERS}
    levels = {name: logger.level for name, logger in loggers.items()}
    env = {name: os.environ.get(name) for name in QUIET_ENV}
    os.environ.update(QUIET_ENV)
    for logger in loggers.values():
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, logger in loggers.items():
            logger.setLevel(levels[name])
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _dispatch(argv: list[str], parser: argparse.ArgumentParser) -> int:
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed its line
        return int(e.code or 0)
    try:
        with libraries_quiet(args.verbose):
            return args.func(args)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"error: {one_line(str(e))}; {BUG_HINT}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # the last line of defence: one line, exit 1, traceback on request
        if os.environ.get("SKIMFORMER_DEBUG"):
            traceback.print_exc()
        print(f"internal error: {type(e).__name__}: {cause(e) if str(e).strip() else ''}; {BUG_HINT}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return _dispatch(sys.argv[1:] if argv is None else argv, build_parser())


def optimize_entry(argv: list[str] | None = None) -> int:
    """`optimize MODEL -o DIR ...`, the same as `skimformer optimize`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--version"],):
        return main(argv)
    return main(["optimize", *argv])


if __name__ == "__main__":
    sys.exit(main())
