"""skimformer: a compiler for transformer inference.

Load a `torch.export` program, find its transformer structure, rewrite it with passes that make
inference skip work, and lower it to a deployable engine.

The public names load on first use, so `import skimformer.kernels` needs only torch (and
triton): a GPU machine runs the kernels and their benchmark without the compiler's dependencies.
"""
from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "UserError": "skimformer.errors", "VerificationError": "skimformer.errors",
    "Model": "skimformer.ir", "Program": "skimformer.ir", "analyze": "skimformer.ir", "load": "skimformer.ir",
    "Engine": "skimformer.backends", "calibrate": "skimformer.api", "optimize": "skimformer.api",
    "tune": "skimformer.api",
}
__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'skimformer' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
