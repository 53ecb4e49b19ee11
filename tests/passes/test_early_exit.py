"""early-exit: CALM exits as torch.cond / ONNX If, checked against the transformers model itself."""
import json

import numpy as np
import onnx
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from skimformer import UserError, load, optimize
from skimformer.backends.generation import generate
from skimformer.cli.main import main
from skimformer.passes import PassManager, pipeline_from
from skimformer.passes.early_exit import confidence, confident
from skimformer.passes.manager import max_abs_error
from skimformer.zoo import build_model
from tests.decoding import hidden_after, torch_runner


def _exits(path, spec):
    model = load(path)
    new, (record,), _ = PassManager(pipeline_from(spec)).run(model)
    return model, new, record


def test_criteria_measure_the_last_positions_distribution():
    logits = torch.log(torch.tensor([[[0.1, 0.2, 0.7]], [[0.5, 0.4, 0.1]]]))
    assert torch.allclose(confidence(logits, "max-prob"), torch.tensor([0.7, 0.5]))
    assert torch.allclose(confidence(logits, "margin"), torch.tensor([0.5, 0.1]))
    uniform = torch.zeros(1, 4)
    assert torch.allclose(confidence(uniform, "entropy"), torch.tensor([0.0]), atol=1e-6)
    # the batch rule: one unsure row keeps the whole batch in
    assert not confident(logits, "max-prob", 0.6) and confident(logits, "max-prob", 0.4)


def test_threshold_one_never_exits_and_is_lossless(tiny_decoder):
    model, new, record = _exits(tiny_decoder, "early-exit(at=[0], threshold=1.0)")
    decode = new.programs["decode"]
    out = decode.run(decode.example_inputs)
    want = model.programs["decode"].run(decode.example_inputs)
    assert int(out["exit_layer"]) == 2
    err, ok = max_abs_error(want, {k: v for k, v in out.items() if k != "exit_layer"})
    assert ok, err
    assert record.report["example_inputs"] == {"histogram": {2: 1}, "mean_depth": 2.0}
    assert new.programs["prefill"] is model.programs["prefill"]  # the prompt's cache stays exact


def test_exit_applies_the_head_and_propagates_the_exit_state_to_skipped_layers(tiny_decoder):
    """Against transformers: the logits are the final norm and LM head on layer 0's output, and
    layer 1's new cache entries are its own key/value projections of that hidden state."""
    model, new, _ = _exits(tiny_decoder, "early-exit(at=[0], threshold=0.0)")
    prefill, decode = model.programs["prefill"].example_inputs, new.programs["decode"].example_inputs
    out = new.programs["decode"].run(decode)
    assert int(out["exit_layer"]) == 1
    hf = build_model("llama")
    n = decode["input_ids"].shape[1]
    hidden = hidden_after(hf, prefill, decode, 1)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], hf.lm_head(hf.model.norm(hidden)), atol=1e-5, rtol=1e-5)
        layer = hf.model.layers[1]
        x = layer.input_layernorm(hidden)
        shape = (x.shape[0], n, -1, hf.config.head_dim)
        key = layer.self_attn.k_proj(x).view(shape).transpose(1, 2)
        value = layer.self_attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = hf.model.rotary_emb(x, decode["position_ids"])
        key = apply_rotary_pos_emb(key, key, cos, sin)[0]
    torch.testing.assert_close(out["present_key_1"][:, :, -n:], key, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["present_value_1"][:, :, -n:], value, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["present_key_1"][:, :, :-n], decode["past_key_1"])


def test_encoder_classifier_exit_equals_the_truncated_model(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from skimformer.zoo.hf_export import export_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, num_labels=3)
    hf = BertForSequenceClassification._from_config(config, attn_implementation="sdpa").eval()
    export_model(hf, tmp_path / "bert")
    model, new, record = _exits(tmp_path / "bert" / "model.pt2", "early-exit(at=[0, 1], threshold=0.0)")
    program = new.programs["model"]
    out = program.run(program.example_inputs)
    assert int(out["exit_layer"]) == 1
    hf.bert.encoder.layer = hf.bert.encoder.layer[:1]
    with torch.no_grad():
        want = hf(**program.example_inputs).logits
    torch.testing.assert_close(out["logits"], want, atol=1e-5, rtol=1e-5)
    assert record.matched == 2
    optimize(tmp_path / "bert" / "model.pt2", "early-exit(at=[0, 1], threshold=1.0)", output=tmp_path / "engine")
    outer = [n for n in onnx.load(str(tmp_path / "engine" / "model.onnx")).graph.node if n.op_type == "If"]
    inner = [n for a in outer[0].attribute if a.name == "else_branch" for n in a.g.node if n.op_type == "If"]
    assert len(outer) == len(inner) == 1  # the second exit nests in the first one's full branch


class _Capture(torch.fx.Interpreter):
    """Runs a graph and keeps the value of one node."""

    def __init__(self, module, name):
        super().__init__(module)
        self.name, self.value = name, None

    def run_node(self, n):
        out = super().run_node(n)
        if n.name == self.name:
            self.value = out
        return out


def test_an_exit_after_tome_applies_the_head_to_the_merged_stream(tmp_path):
    """ToMe merges inside each block (after attention), so block 0 leaves with fewer tokens than
    it took and block 1 takes fewer again: the exit's hidden state is block 0's merged output,
    and the classifier reads its CLS token. A program that also returns the restored
    last_hidden_state cannot exit there (its merges are made in the skipped blocks)."""
    from transformers import ViTConfig, ViTForImageClassification

    from skimformer.ir.structure import analyze
    from skimformer.zoo.hf_export import export_model

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=5)
    hf = ViTForImageClassification._from_config(config, attn_implementation="sdpa").eval()
    export_model(hf, tmp_path / "vit")
    _, tomed, _ = _exits(tmp_path / "vit" / "model.pt2", "tome(r=2)")
    blocks = analyze(tomed.programs["model"]).blocks
    tokens = [(b.input.meta["val"].shape[1], b.output.meta["val"].shape[1]) for b in blocks]
    assert tokens == [(17, 15), (15, 13)]
    spec = "tome(r=2); early-exit(at=[0], threshold=0.0)"
    new = PassManager(pipeline_from(spec)).run(load(tmp_path / "vit" / "model.pt2"))[0]
    program = new.programs["model"]
    out = program.run(program.example_inputs)
    assert int(out["exit_layer"]) == 1
    capture = _Capture(tomed.programs["model"].ep.module(), blocks[0].output.name)
    with torch.no_grad():
        capture.run(*program.example_inputs.values())
        want = hf.classifier(hf.vit.layernorm(capture.value)[:, 0])
    torch.testing.assert_close(out["logits"], want, atol=1e-5, rtol=1e-5)

    class BothOutputs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, pixel_values):
            hidden = self.hf.vit(pixel_values=pixel_values).last_hidden_state
            return {"logits": self.hf.classifier(hidden[:, 0]), "last_hidden_state": hidden}

    pixels = program.example_inputs["pixel_values"]
    both = torch.export.export(BothOutputs(), (pixels,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
    torch.export.save(both, tmp_path / "both.pt2")
    with pytest.raises(UserError, match="gives only logits, but the program also returns last_hidden_state: export logits only"):
        PassManager(pipeline_from(spec)).run(load(tmp_path / "both.pt2"))


def test_engine_runs_the_exit_as_onnx_if_and_reports_depth(tiny_decoder, tmp_path, capsys):
    engine = optimize(tiny_decoder, "early-exit(at=[0], threshold=0.0)", output=tmp_path / "exits")
    graph = onnx.load(str(tmp_path / "exits" / "decode.onnx")).graph
    assert [n.op_type for n in graph.node].count("If") == 1
    prompt = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (prompt > 0).astype(np.int64)
    result = engine.generate_with_stats(prompt, 6, attention_mask=mask)
    assert result.extra["mean_exit_layer"] == 1.0 and result.extra["exit_histogram"] == {"1": 5}
    model = load(tmp_path / "exits")
    assert (result.ids == generate(torch_runner(model), prompt, 6, mask).ids).all()
    assert main(["generate", str(tmp_path / "exits"), "--prompt-ids", "5,6,7", "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["mean_exit_layer"] == 1.0


@pytest.mark.parametrize("spec, message", [
    ("early-exit(at=[2])", "exits go after blocks 0..1"),
    ("early-exit(at=[0], criterion=odds)", "criterion must be one of"),
    ("early-exit(at=[0], threshold=1.5)", "threshold is a confidence"),
    ("kv-quant(bits=4); early-exit(at=[0])", "cannot follow kv-quant"),
    ("early-exit(at=[0]); kv-window(sink=2, window=6)", "put kv-window before the exit pass"),
])
def test_bad_configurations_are_refused(tiny_decoder, spec, message):
    with pytest.raises(UserError, match=message):
        _exits(tiny_decoder, spec)


def test_an_encoder_without_a_head_is_refused(exported):
    with pytest.raises(UserError, match="needs the model's head"):
        _exits(exported("bert"), "early-exit(at=[0])")


def _heads(tmp_path, kind="decoder", dim=64, at=(0,), threshold=0.0):
    from skimformer.ir.exit_heads import ExitHeads

    g = torch.Generator().manual_seed(1)
    adapters = {k: (torch.randn(4, dim, generator=g), torch.randn(dim, 4, generator=g) * 0.1) for k in at}
    per_exit = {k: 0.5 for k in at}
    heads = ExitHeads(kind=kind, adapters=adapters, criterion="max-prob", thresholds={k: threshold for k in at},
                      target_agreement=0.99, agreement_before=per_exit, agreement_after=per_exit, exit_rate=per_exit)
    heads.save(tmp_path / "heads.safetensors")
    return heads, str(tmp_path / "heads.safetensors")


def test_calibrated_heads_put_their_adapter_before_the_head_and_their_thresholds_in(tiny_decoder, tmp_path):
    from skimformer.ir.exit_heads import adapt

    heads, path = _heads(tmp_path, threshold=0.0)
    model, new, record = _exits(tiny_decoder, f"early-exit(heads='{path}')")
    assert record.report["at"] == [0] and record.report["thresholds"] == {"0": 0.0} and record.report["adapters"]
    prefill, decode = model.programs["prefill"].example_inputs, new.programs["decode"].example_inputs
    out = new.programs["decode"].run(decode)
    assert int(out["exit_layer"]) == 1
    hf = build_model("llama")
    hidden = hidden_after(hf, prefill, decode, 1)
    with torch.no_grad():
        want = hf.lm_head(hf.model.norm(adapt(hidden, *heads.adapters[0])))
    torch.testing.assert_close(out["logits"], want, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="has adapters for exits"):
        _exits(tiny_decoder, f"early-exit(at=[0, 1], heads='{path}')")


def test_an_exit_after_the_last_block_leaves_with_the_full_models_output(tiny_decoder):
    model, new, _ = _exits(tiny_decoder, "early-exit(at=[1], threshold=0.0)")
    decode = new.programs["decode"]
    out = decode.run(decode.example_inputs)
    assert int(out.pop("exit_layer")) == 2
    err, ok = max_abs_error(model.programs["decode"].run(decode.example_inputs), out)
    assert ok, err


def test_views_of_tensors_before_an_exit_are_recomputed_in_the_branches():
    """Each layer's `cos.unsqueeze(1)` reads a tensor from before the exit: passed as two cond
    operands they would alias one tensor, which torch.cond refuses (seen on SmolLM2, where each
    layer after the exit takes its own view of the shared rotary tables)."""
    from skimformer.ir.exits import cut_after

    class TwoLayersOfViews(torch.nn.Module):
        def forward(self, x, cos):
            hidden = x * 2
            return {"out": hidden * cos.unsqueeze(1) + hidden.sin() * cos.unsqueeze(1)}

    ep = torch.export.export(TwoLayersOfViews(), (torch.randn(2, 3, 4), torch.randn(2, 4)))
    graph = ep.graph
    hidden = next(n for n in graph.nodes if n.target is torch.ops.aten.mul.Tensor)
    cut = cut_after(graph, hidden, list(graph.output_node().args[0]))
    assert [n.name for n in cut.operands] == ["cos", "mul"]
    assert sum(n.target is torch.ops.aten.unsqueeze.default for n in cut.sizes) == 2
