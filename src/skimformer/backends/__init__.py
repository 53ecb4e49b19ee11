"""backends: lower a rewritten model to an engine folder and load it back as an `Engine`."""
from skimformer.backends.engine import Engine
from skimformer.backends.registry import BACKENDS, backend_module

__all__ = ["BACKENDS", "Engine", "backend_module"]
