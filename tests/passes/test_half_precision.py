"""Every pass on half-precision programs (issue #14 item 4): fp16 and bf16 exports of a tiny BERT
(2 layers, hidden 64) and of the zoo's tiny Llama decoder, rewritten by the pass manager.

Each pass runs on both dtypes; the rewritten programs' outputs stay in the program's dtype and
are finite. Lossless rewrites (canonicalize-attention, self-speculate, and tome/prune configured
to change nothing) must match the fp32 model within `tolerance(dtype) * max(1, max|reference|)`,
16 ulps of the half dtype: the half programs themselves are 1.5 ulps from fp32 on these models,
and a wrong rewrite is off by the size of the outputs (self-speculate is checked by the pass
manager, against the half program, at that tolerance). Lossy ones must report a finite fidelity
against the same half program unoptimized, measured where they act.

Engines: every fp16 case but the decoder passes in NO_ENGINE builds its ONNX Runtime engine,
which checks it against its program at the program's precision. bf16 builds no engine: engines take and return numpy arrays and numpy
has no bfloat16 (nor do ONNX Runtime's CPU kernels run it), so `optimize` refuses it and the
bf16 programs are checked in torch.

Time: a decoder rewrite re-exports two programs (about 6 s of CPU each) and a decoder engine
exports two to ONNX, so `make test-fast` runs every encoder pass in fp16 (canonicalize-attention
in bf16 too) and, of the decoder passes, prompt-prune and kv-quant in bf16 (a bf16 cache threaded
through numpy by the fidelity measurement); the other cases are marked slow. The dtype rules
are unit-tested here too: padding masks, KIVI scales, eager attention's where() fills.
"""
import math

import numpy as np
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.backends.build import build_engine
from skimformer.ir import Model, Program
from skimformer.ir.exit_heads import ExitHeads
from skimformer.kernels import merge, quant, tokens
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.manager import tolerance
from skimformer.zoo import build_model
from skimformer.zoo.hf_export import export_decoder
from tests.conftest import FAMILIES, TextEncoder, export_text

HALF = [torch.float16, torch.bfloat16]


def dtypes(*slow: torch.dtype) -> list:
    """fp16 and bf16 as test parameters, those in `slow` marked slow."""
    return [pytest.param(dtype, id=str(dtype).removeprefix("torch."), marks=[pytest.mark.slow] * (dtype in slow))
            for dtype in HALF]


DECODER_PASSES = {
    "prompt-prune": "prompt-prune(layer=0, keep=0.5)",
    "kv-window": "kv-window(sink=2, window=8)",
    "kv-evict": "kv-evict(keep=0.5, window=4)",
    "kv-quant": "kv-quant(bits=4, group=8, residual=8)",
    "kv-quant-channel": "kv-quant(scheme=channel, bits=8)",
    "early-exit": "early-exit(heads='{heads}')",
    "self-speculate": "self-speculate(exit=1, draft=3, heads='{heads}')",
}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """`bert(dtype, impl)` -> (path of the half export, the fp32 model's outputs on its example
    inputs); the same seeded weights in both dtypes."""
    cache, root = {}, tmp_path_factory.mktemp("half-bert")

    def get(dtype: torch.dtype, impl: str = "sdpa"):
        if (dtype, impl) not in cache:
            torch.manual_seed(0)
            fp32 = FAMILIES["bert"](impl).eval()
            half = FAMILIES["bert"](impl).eval()
            half.load_state_dict(fp32.state_dict())
            ep = export_text(half.to(dtype))
            path = root / f"bert-{impl}-{dtype}.pt2"
            torch.export.save(ep, path)
            with torch.no_grad():
                reference = TextEncoder(fp32)(*ep.example_inputs[0])
            cache[(dtype, impl)] = path, reference
        return cache[(dtype, impl)]

    return get


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """`llama(dtype)` -> (the zoo's tiny Llama exported in `dtype` as a decoder folder, the pipeline
    of each decoder pass, with calibrated-like exit heads). Layer 0's first KV head has a dead key
    channel pair (0 and 8, which rotary mixes): its keys are 0 there, a constant KIVI block."""
    cache, root = {}, tmp_path_factory.mktemp("half-llama")

    def get(dtype: torch.dtype):
        if dtype not in cache:
            folder = root / str(dtype).removeprefix("torch.")
            folder.mkdir()
            model = build_model("llama")
            model.model.layers[0].self_attn.k_proj.weight.data[[0, 8]] = 0
            export_decoder(model.to(dtype), folder, 2, 16, False, lambda message: None)
            specs = {name: spec.format(heads=_exit_heads(root)) for name, spec in DECODER_PASSES.items()}
            cache[dtype] = folder, specs
        return cache[dtype]

    return get


def _exit_heads(folder) -> str:
    """Adapters for the exit after block 0, fp32 as `skimformer calibrate` saves them, with a
    threshold every step passes."""
    g = torch.Generator().manual_seed(1)
    heads = ExitHeads(kind="decoder", adapters={0: (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))},
                      criterion="max-prob", thresholds={0: 0.0}, target_agreement=0.99, agreement_before={0: 0.5},
                      agreement_after={0: 0.5}, exit_rate={0: 0.5})
    heads.save(folder / "heads.safetensors")
    return str(folder / "heads.safetensors")


def _rewrite(path, spec: str):
    """(model, rewritten model, record, fidelity), after checking that every output of the
    rewritten programs is finite and in the program's dtype."""
    model = load(path)
    new, (record,), fidelity = PassManager(pipeline_from(spec)).run(model)
    assert record.matched
    dtype = next(iter(model.programs.values())).precision
    for program in new.programs.values():
        for name, value in program.run(program.example_inputs).items():
            if value.is_floating_point():
                assert value.dtype == dtype and torch.isfinite(value).all(), f"{program.role}.{name}"
    return model, new, record, fidelity


def _engine(model, new, record, fidelity, out) -> None:
    """The ONNX Runtime engine builds (its parity is checked at build) and its outputs are finite fp16."""
    engine, report = build_engine(new, model, out, records=[record], fidelity=fidelity)
    assert report["parity"]["ok"]
    for role, program in new.programs.items():
        for name, value in engine.run(program.example_inputs, role).items():
            if np.issubdtype(value.dtype, np.floating):
                assert value.dtype == np.float16 and np.isfinite(value).all(), f"{role}.{name}"


def _lossy(fidelity: dict) -> None:
    """Measured where the pass acts, and every figure finite."""
    assert set(fidelity["exercised"].values()) == {"exercised"}, fidelity["exercised"]
    figures = {k: v for k, v in fidelity.items() if isinstance(v, float)}
    assert figures and all(math.isfinite(v) for v in figures.values()), figures


def _matches_fp32(new, reference: dict, dtype: torch.dtype) -> None:
    program = new.programs["model"]
    got = program.run(program.example_inputs)["last_hidden_state"].double()
    want = reference["last_hidden_state"].double()
    assert (got - want).abs().max().item() <= tolerance(dtype) * max(1.0, want.abs().max().item())


def _encoder(path, spec: str, dtype: torch.dtype, out):
    """An encoder pass, and for fp16 its engine."""
    model, new, record, fidelity = _rewrite(path, spec)
    if dtype == torch.float16:
        _engine(model, new, record, fidelity, out)
    return new, record, fidelity


# -- the references' masking and quantization in fp16 ------------------------------------------


def test_padding_at_fp16s_most_negative_value_is_padding():
    """transformers masks padding with finfo(dtype).min, -65504 in fp16: padding, even where it
    scores highest."""
    keep = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    mask = torch.zeros(2, 1, 8, 8).masked_fill(~keep[:, None, None], torch.finfo(torch.float16).min).half()
    scores = torch.arange(8.0).expand(2, 8)  # fp32, as token_scores gives them
    assert tokens.topk_tokens_ref(scores, mask, 0.5, 1)[1].tolist() == [0, 2, 3, 4, 5]
    assert torch.equal(merge.token_sizes_ref(torch.zeros(2, 8, 4, dtype=torch.float16), mask, 1), keep.float())


def test_kivi_scales_of_constant_and_wide_groups_in_fp16():
    """A constant group needs a positive scale that fp16 stores (1e-8 is 0 there), and a group
    spanning -60000..60000 has a range fp16 cannot hold: both decode to what they stand for."""
    x = torch.full((1, 1, 8, 16), 0.5, dtype=torch.float16)
    x[:, :, 4:] = torch.linspace(-60000, 60000, 64).reshape(4, 16).half()
    codes, scale, zero = quant.quantize_ref(x, 4, 4, 0)
    assert scale.dtype == torch.float16 and (scale > 0).all() and torch.isfinite(scale).all()
    back = quant.dequantize_ref(codes, scale, zero, 4, 4, 0)
    assert torch.equal(back[:, :, :4], x[:, :, :4].float())
    assert ((back[:, :, 4:] - x[:, :, 4:].float()).abs() <= scale[:, :, 1:].float() / 2 * 1.01).all()


# -- encoder passes -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", dtypes())
def test_canonicalize_attention(bert, dtype, tmp_path):
    path, reference = bert(dtype, "eager")
    new, record, _ = _encoder(path, "canonicalize-attention", dtype, tmp_path / "e")
    assert record.report["rewritten"] == 2
    _matches_fp32(new, reference, dtype)


class WhereMasked(torch.nn.Module):
    """Eager attention masked as GPT-2 masks it: where(keep, scores, finfo(dtype).min)."""

    def forward(self, q, k, v, keep):
        scores = torch.where(keep[:, None, None, :], q @ k.transpose(-1, -2) * 0.25, torch.finfo(q.dtype).min)
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("dtype", dtypes())
def test_canonicalize_attention_reads_the_dtypes_mask_fill(dtype):
    q, k, v = (torch.randn(2, 3, 5, 16, dtype=dtype) for _ in range(3))
    keep = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    program = Program(torch.export.export(WhereMasked(), (q, k, v, keep)))
    _, (record,), _ = PassManager(pipeline_from("canonicalize-attention")).run(Model({"model": program}))
    assert record.matched == 1  # and the manager found it lossless at the dtype's tolerance


@pytest.mark.parametrize("spec, tokens_after", [("tome(r=2)", [12, 10]), ("prune(keep=0.5, at=[0])", [12, 8])],
                         ids=["tome", "prune"])
@pytest.mark.parametrize("dtype", dtypes(torch.bfloat16))
def test_token_pass(bert, dtype, spec, tokens_after, tmp_path):
    _, record, fidelity = _encoder(bert(dtype)[0], spec, dtype, tmp_path / "e")
    assert record.report["tokens_per_block"]["after"] == tokens_after
    _lossy(fidelity)


@pytest.mark.parametrize("spec", ["tome(r=0)", "prune(keep=1.0, at=[0], score=mean-attention)"],
                         ids=["tome-merging-nothing", "prune-keeping-everything"])
@pytest.mark.parametrize("dtype", dtypes(torch.bfloat16))
def test_token_pass_that_removes_nothing_matches_fp32(bert, dtype, spec):
    """tome r=0: identity merges in both blocks, through the merge ops and proportional
    attention; prune keep=1.0: every token kept, through the selection ops."""
    path, reference = bert(dtype)
    _matches_fp32(_rewrite(path, spec)[1], reference, dtype)


@pytest.mark.parametrize("dtype", dtypes(torch.bfloat16))
def test_skip_layers(bert, dtype, tmp_path):
    _lossy(_encoder(bert(dtype)[0], "skip-layers(layers=[1])", dtype, tmp_path / "e")[2])


@pytest.mark.parametrize("dtype", dtypes(torch.bfloat16))
def test_skip_ffn(bert, dtype, tmp_path):
    _lossy(_encoder(bert(dtype)[0], "skip-ffn(layers=[1])", dtype, tmp_path / "e")[2])


def test_bfloat16_engines_are_refused_before_the_passes_run(bert, tmp_path):
    with pytest.raises(UserError, match="bfloat16.*float16"):
        optimize(bert(torch.bfloat16)[0], passes="tome(r=2)", output=tmp_path / "e")
    assert not (tmp_path / "e").exists()


# -- decoder passes -----------------------------------------------------------------------------


# Passes whose fp16 engine adds nothing to the program-level checks: kv-window and kv-evict only
# select and gather tokens (index ops, the same in every dtype) around the exporter's own
# attention; self-speculate's programs are the model's own layers (the manager checks them
# lossless at the dtype's tolerance) on the fp16 kernels the early-exit engine already runs.
NO_ENGINE = ("kv-window", "kv-evict", "self-speculate")


def _decoder(llama, name: str, dtype: torch.dtype, out):
    """A decoder pass, and for fp16 its engine (unless it is in NO_ENGINE)."""
    folder, specs = llama(dtype)
    model, new, record, fidelity = _rewrite(folder, specs[name])
    if dtype == torch.float16 and name not in NO_ENGINE:
        _engine(model, new, record, fidelity, out)
    return new, fidelity


@pytest.mark.parametrize("dtype", dtypes(torch.float16))
def test_prompt_prune(llama, dtype, tmp_path):
    """The example prompt's second row is left-padded, in an additive mask at the dtype's most
    negative value: the kept tokens are all real."""
    new, fidelity = _decoder(llama, "prompt-prune", dtype, tmp_path / "e")
    prefill = new.programs["prefill"]
    kept = prefill.run(prefill.example_inputs)["attention_mask"]
    assert kept.shape[1] == 9 and kept[1].all()  # 1 + ceil(0.5 * 15) of 12 real tokens
    _lossy(fidelity)


@pytest.mark.parametrize("dtype", dtypes(*HALF))
def test_kv_window(llama, dtype, tmp_path):
    _lossy(_decoder(llama, "kv-window", dtype, tmp_path / "e")[1])


@pytest.mark.parametrize("dtype", dtypes(*HALF))
def test_kv_evict(llama, dtype, tmp_path):
    _lossy(_decoder(llama, "kv-evict", dtype, tmp_path / "e")[1])


@pytest.mark.parametrize("dtype", dtypes(torch.float16))
def test_kv_quant(llama, dtype, tmp_path):
    """The dead key channel's groups are constant: their scales are still positive in the dtype."""
    new, fidelity = _decoder(llama, "kv-quant", dtype, tmp_path / "e")
    prefill = new.programs["prefill"]
    scales = {k: v for k, v in prefill.run(prefill.example_inputs).items() if "scale" in k}
    assert scales and all(v.dtype == dtype and (v > 0).all() for v in scales.values())
    _lossy(fidelity)


@pytest.mark.parametrize("dtype", dtypes(*HALF))
def test_kv_quant_channel(llama, dtype, tmp_path):
    _lossy(_decoder(llama, "kv-quant-channel", dtype, tmp_path / "e")[1])


@pytest.mark.parametrize("dtype", dtypes(*HALF))
def test_early_exit_with_calibrated_heads(llama, dtype, tmp_path):
    """The adapters are saved in fp32 and inserted in the program's dtype."""
    new, fidelity = _decoder(llama, "early-exit", dtype, tmp_path / "e")
    decode = new.programs["decode"]
    assert int(decode.run(decode.example_inputs)["exit_layer"]) == 1
    _lossy(fidelity)


@pytest.mark.parametrize("dtype", dtypes(*HALF))
def test_self_speculate_with_calibrated_heads(llama, dtype, tmp_path):
    """Lossless: the manager has checked prefill and decode at the program's precision; the
    draft's head reads the adapter, inserted in the program's dtype."""
    new, _ = _decoder(llama, "self-speculate", dtype, tmp_path / "e")
    assert set(new.programs) == {"prefill", "decode", "draft", "verify"}
