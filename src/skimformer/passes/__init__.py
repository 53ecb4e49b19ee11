"""passes: Program -> Program rewrites, their registry, pipeline grammar and manager.

Importing this package registers every pass (one module each).
"""
from skimformer.passes import canonicalize_attention, prune, tome  # noqa: F401  (registers the passes)
from skimformer.passes import prompt_prune  # noqa: F401  (registers the pass)
from skimformer.passes import kv_evict  # noqa: F401  (registers the pass)
from skimformer.passes import kv_window  # noqa: F401  (registers the pass)
from skimformer.passes import kv_quant  # noqa: F401  (registers the pass)
from skimformer.passes import skip_ffn, skip_layers  # noqa: F401  (registers the passes)
from skimformer.passes import early_exit  # noqa: F401  (registers the pass)
from skimformer.passes import self_speculate  # noqa: F401  (registers the pass)
from skimformer.passes.base import ModelResult, Pass, PassResult
from skimformer.passes.manager import PassManager, PassRecord
from skimformer.passes.registry import all_passes, get_pass, register
from skimformer.passes.spec import pipeline_from

__all__ = ["ModelResult", "Pass", "PassManager", "PassRecord", "PassResult", "all_passes", "get_pass",
           "pipeline_from", "register"]
