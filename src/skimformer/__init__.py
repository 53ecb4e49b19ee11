"""skimformer: a compiler for transformer inference.

Load a `torch.export` program, find its transformer structure, rewrite it with passes that make
inference skip work, and lower it to a deployable engine.
"""

__version__ = "0.1.0"

from skimformer.errors import UserError, VerificationError  # noqa: E402
from skimformer.ir import Model, Program, analyze, load  # noqa: E402
from skimformer.backends import Engine  # noqa: E402
from skimformer.api import calibrate, optimize  # noqa: E402

__all__ = ["Engine", "Model", "Program", "UserError", "VerificationError", "analyze", "calibrate", "load", "optimize", "__version__"]
