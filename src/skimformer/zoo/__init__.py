"""zoo: reference models built from transformers configs, real small models, and the exporter."""
from skimformer.zoo.builders import FAMILIES, build_model, export_zoo
from skimformer.zoo.hf_export import export_model, export_pretrained, is_causal_lm, load_pretrained
from skimformer.zoo.real import (MissingModel, efficientnet_lite0, export_efficientnet, export_minilm,
                                 export_smollm2, minilm, smollm2)

__all__ = ["FAMILIES", "MissingModel", "build_model", "efficientnet_lite0", "export_efficientnet", "export_minilm",
           "export_model", "export_pretrained", "export_smollm2", "export_zoo", "is_causal_lm", "load_pretrained",
           "minilm", "smollm2"]
