"""`make demo`: export a small ViT and a small Llama-style decoder, inspect and optimize each with
the real command line (tome on the ViT, prompt-prune on the decoder), and print the reports.
Run as `python -m skimformer.demo [FOLDER]`."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from skimformer.zoo import export_zoo


def _cli(*args) -> None:
    exe = Path(sys.executable).parent
    cmd = [str(exe / args[0]), *map(str, args[1:])]
    print(f"\n$ {shlex.join([args[0], *map(str, args[1:])])}", flush=True)
    subprocess.run(cmd, check=True)


def main(folder: str = "demo") -> None:
    root = Path(folder)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print("exporting a small ViT (encoder) and a small Llama (decoder: prefill + decode) from transformers configs")
    export_zoo("vit", root / "vit", size="tiny")
    export_zoo("llama", root / "llama", size="tiny")
    _cli("skimformer", "inspect", root / "vit" / "model.pt2")
    _cli("optimize", root / "vit" / "model.pt2", "-o", root / "vit-engine", "--passes", "tome(r=3)", "--measure")
    _cli("skimformer", "inspect", root / "llama")
    _cli("optimize", root / "llama", "-o", root / "llama-engine", "--passes", "prompt-prune(layer=0, keep=0.5)",
         "--measure")
    _cli("skimformer", "run", root / "llama-engine", "--program", "decode")
    print(f"\nengines and reports are in {root}/vit-engine and {root}/llama-engine (report.md, report.json)")
    print("these models are tiny, so the token ops cost more than the tokens they save; "
          "`make bench-tokens` measures ViT-B/16, BERT-base, MiniLM and SmolLM2")


if __name__ == "__main__":
    main(*sys.argv[1:2])
