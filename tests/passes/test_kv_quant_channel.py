"""kv-quant(scheme=channel): per-channel int8/int4 caches with calibrated scales, run by ONNX
Runtime's quantized GroupQueryAttention (and decomposed for every other engine)."""
import json

import numpy as np
import onnx
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.backends.generation import generate
from skimformer.kernels.channel_quant import dequantize_channels, quantize_channels
from skimformer.passes import pipeline_from
from tests.decoding import torch_runner


def test_codes_round_to_the_nearest_step_and_pack_the_even_channel_low():
    scale = torch.full((1, 1, 1, 4), 0.5)
    x = torch.tensor([[[[0.74, -1.26, 3.9, -10.0]]]])
    np.testing.assert_array_equal(quantize_channels(x, scale, 8).numpy().ravel(), [1, -3, 8, -20])
    packed = quantize_channels(x, scale, 4)  # codes 1, -3, 7 (clipped from 8), -8 (clipped), +8 each
    assert packed.dtype == torch.uint8 and packed.shape[-1] == 2
    assert packed.numpy().ravel().tolist() == [9 + 5 * 16, 15 + 0 * 16]
    np.testing.assert_allclose(dequantize_channels(packed, scale, 4).numpy().ravel(), [0.5, -1.5, 3.5, -4.0])
    within = torch.randn(2, 2, 5, 4) * 0.2
    assert (dequantize_channels(quantize_channels(within, scale, 8), scale, 8) - within).abs().max() <= 0.25


@pytest.mark.parametrize("bits", [8, 4])
def test_channel_cache_runs_fused_in_place_and_matches_its_programs(tiny_decoder, tmp_path, bits):
    engine = optimize(tiny_decoder, f"kv-quant(scheme=channel, bits={bits})", output=tmp_path / "eng")
    report = json.loads((engine.folder / "report.json").read_text())
    assert report["parity"]["ok"] and report["parity"]["max_abs"] < 1e-4
    assert report["passes"][0]["report"]["decode"]["kv_cache_bytes"]["ratio"] == pytest.approx(bits / 32)
    assert report["fidelity"]["exercised"]["kv-quant"] == "exercised"
    decode = onnx.load(str(engine.folder / "decode.onnx"), load_external_data=False).graph
    attention = [n for n in decode.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == 2
    attributes = {a.name: (a.s.decode() if a.s else a.i) for a in attention[0].attribute}
    assert attributes["k_quant_type"] == "PER_CHANNEL" and attributes["kv_cache_bit_width"] == bits
    assert engine.runners["decode"].in_place_cache
    ids = np.random.default_rng(0).integers(3, 300, (2, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    out = engine.run({"input_ids": ids, "attention_mask": mask, "position_ids": np.maximum(mask.cumsum(1) - 1, 0)},
                     "prefill")
    assert out["present_key_0"].dtype == (np.int8 if bits == 8 else np.uint8)
    assert out["present_key_0"].shape == (2, 2, 10, 16 * bits // 8)
    want = generate(torch_runner(load(engine.folder)), ids, 10, mask).ids
    np.testing.assert_array_equal(engine.generate(ids, 10, mask), want)


def test_portable_engine_decomposes_the_channel_cache(tiny_decoder, tmp_path):
    engine = optimize(tiny_decoder, "kv-quant(scheme=channel, bits=8)", output=tmp_path / "eng",
                      backend_options={"portable": True})
    decode = onnx.load(str(engine.folder / "decode.onnx"), load_external_data=False).graph
    assert not [n for n in decode.node if n.domain]
    assert json.loads((engine.folder / "report.json").read_text())["parity"]["ok"]


def test_channel_scheme_takes_8_or_4_bits_and_a_plain_cache(tiny_decoder):
    with pytest.raises(UserError, match="bits 8 or 4"):
        pipeline_from("kv-quant(scheme=channel, bits=2)")
    with pytest.raises(UserError, match="scheme must be"):
        pipeline_from("kv-quant(scheme=tensor)")
    with pytest.raises(UserError, match="plain growing cache"):
        optimize(tiny_decoder, "kv-window(sink=2, window=4); kv-quant(scheme=channel, bits=8)")


def test_rounded_parity_is_judged_at_the_scale_of_one_code():
    """Another runtime's last-bit float differences flip some codes by one step, which then
    moves the floats after them: checked by cosine and the share of identical codes."""
    from skimformer.backends.build import _compare_rounded

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    codes = torch.randint(-100, 100, (2, 3, 40, 8), dtype=torch.int8)
    flipped = codes.clone()
    flipped.view(-1)[::10] += 1  # a tenth of the codes one step off
    near = {"logits": (logits + 1e-3 * torch.randn_like(logits)).numpy(), "present_key_0": flipped.numpy()}
    check = _compare_rounded({"logits": logits, "present_key_0": codes}, near)
    assert check["ok"] and check["rounded"]["codes_identical"] == pytest.approx(0.9, abs=0.01)
    far = {"logits": torch.randn_like(logits).numpy(), "present_key_0": codes.numpy()}
    assert not _compare_rounded({"logits": logits, "present_key_0": codes}, far)["ok"]
    flipped.view(-1)[::2] += 1
    assert not _compare_rounded({"logits": logits, "present_key_0": codes},
                                {"logits": logits.numpy(), "present_key_0": flipped.numpy()})["ok"]
