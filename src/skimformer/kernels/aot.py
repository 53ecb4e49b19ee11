"""Ahead-of-time compilation of the skim Triton kernels to PTX and cubin, for engines that load
kernels themselves (TensorRT plugins) instead of launching them through Triton.

Triton compiles for a named target without a GPU, so this runs on any machine with triton. Each
kernel module lists in `AOT` one configuration per kernel (argument types, constexprs, launch
options) at the shapes that matter: what a plugin for other shapes compiles is the same call with
another entry.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

INDEX = "kernels.json"


class AotEntry(NamedTuple):
    """One configuration of a kernel: `triton.compile(ASTSource(fn=kernel, signature=signature,
    constexprs=constexprs, attrs=attrs), target=GPUTarget("cuda", arch, 32), options=options)`.
    The signature names every argument ("constexpr" for those in constexprs); attrs mark the
    16-aligned pointers and sizes a real launch would have (Triton specializes on them)."""

    name: str
    kernel: object
    signature: dict
    constexprs: dict
    options: dict
    attrs: dict | None = None


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def aot_entries() -> list[AotEntry]:
    """Every kernel configuration the skim kernel modules list."""
    from skimformer.kernels import triton_kv, triton_tokens

    return [*triton_tokens.AOT, *triton_kv.AOT]


def compile_kernels(folder: str | Path, arch: int = 90, entries: list[AotEntry] | None = None) -> list[str]:
    """Compile every entry for sm_`arch` into `folder` (NAME.ptx, NAME.cubin and an index,
    kernels.json, with each kernel's symbol, launch options and shared memory); returns the
    files written."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("Triton's interpreter is on (TRITON_INTERPRET=1): its kernels do not compile; "
                           "compile in a process without it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index, written = [], []
    for entry in aot_entries() if entries is None else entries:
        source = ASTSource(fn=entry.kernel, signature=entry.signature, constexprs=entry.constexprs,
                           attrs=entry.attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(entry.options))
        stem = _file_stem(entry.name)
        (folder / f"{stem}.ptx").write_text(compiled.asm["ptx"])
        (folder / f"{stem}.cubin").write_bytes(compiled.asm["cubin"])
        written += [f"{stem}.ptx", f"{stem}.cubin"]
        index.append({"name": entry.name, "symbol": compiled.metadata.name, "ptx": f"{stem}.ptx",
                      "cubin": f"{stem}.cubin", "arch": f"sm_{arch}", "num_warps": compiled.metadata.num_warps,
                      "shared_bytes": compiled.metadata.shared,
                      "signature": {k: v for k, v in entry.signature.items() if v != "constexpr"},
                      "constexprs": {k: v if isinstance(v, (int, float, bool, str)) else str(v)
                                     for k, v in entry.constexprs.items()}})
    (folder / INDEX).write_text(json.dumps(index, indent=2))
    return [*written, INDEX]
