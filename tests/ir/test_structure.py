"""Structure analysis across families, attention forms, static and dynamic shapes."""
import pytest
import torch

from skimformer import analyze, load
from skimformer.ir import Program


def summary(path):
    return analyze(load(path).programs["model"]).summary()


@pytest.mark.parametrize("family", ["bert", "distilbert", "albert", "gpt2", "llama", "vit"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_blocks_attention_and_token_axis(exported, family, impl):
    s = summary(exported(family, impl))
    assert s["blocks"] == 2
    assert s["attention_sites"] == 2
    assert s["token_axis"] == 1
    kinds = {a["kind"] for a in s["detail"]["attention"]}
    assert kinds == ({"fused"} if impl == "sdpa" else {"eager"})


@pytest.mark.parametrize("family", ["bert", "vit", "llama"])
def test_static_shapes(exported, family):
    s = summary(exported(family, dynamic=False))
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (2, 2, 1)
    assert all(isinstance(d, int) for t in s["inputs"] for d in t["shape"])


def test_dynamic_shapes_are_symbolic(exported):
    s = summary(exported("bert"))
    assert all(isinstance(d, str) for d in s["inputs"][0]["shape"])


def test_albert_shared_layer_counts_each_call(exported):
    s = summary(exported("albert"))
    paths = [b["path"] for b in s["detail"]["blocks"]]
    assert len(paths) == 2 and paths[0] == paths[1]  # one module, two calls
    assert s["uniform_blocks"]


def test_heads(exported):
    assert set(summary(exported("llama"))["heads"]) == {"final_norm", "lm_head"}
    assert set(summary(exported("gpt2"))["heads"]) == {"final_norm", "lm_head"}
    assert summary(exported("bert"))["heads"] == []  # only last_hidden_state is returned


def test_gqa_head_counts(exported):
    attn = summary(exported("llama"))["detail"]["attention"][0]
    assert (attn["heads"], attn["kv_heads"], attn["head_dim"]) == (4, 2, 16)


class HandWritten(torch.nn.Module):
    """A transformer written by hand around torch.nn.TransformerEncoder, with a classifier."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 32)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True, dropout=0.0)
        self.enc = torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
        self.cls = torch.nn.Linear(32, 5)

    def forward(self, input_ids):
        return self.cls(self.enc(self.emb(input_ids))[:, 0])


@pytest.mark.parametrize("dynamic", [True, False])
def test_hand_written_transformer(dynamic):
    dims = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},) if dynamic else None
    ep = torch.export.export(HandWritten().eval(), (torch.randint(0, 100, (2, 10)),), dynamic_shapes=dims)
    s = analyze(Program(ep)).summary()
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (3, 3, 1)
    assert s["heads"] == ["classifier"]


def test_inline_attention_without_modules():
    """No nn_module_stack to go on: each attention site still counts as a block."""

    class Inline(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(2, 16, 16))

        def forward(self, x):
            for i in range(2):
                q = (x @ self.w[i]).unsqueeze(1)
                x = x + torch.nn.functional.scaled_dot_product_attention(q, q, q).squeeze(1)
            return x

    s = analyze(Program(torch.export.export(Inline(), (torch.randn(2, 8, 16),)))).summary()
    assert (s["blocks"], s["attention_sites"]) == (2, 2)


def test_cnn_has_no_transformer_structure():
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 4))
    s = analyze(Program(torch.export.export(cnn.eval(), (torch.randn(1, 3, 16, 16),)))).summary()
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (0, 0, None)


def test_decoder_kv_ports(tiny_decoder):
    model = load(tiny_decoder)
    prefill, decode = (analyze(model.programs[r]).summary() for r in ("prefill", "decode"))
    assert prefill["kv_cache"] == {"inputs": 0, "outputs": 4}
    assert decode["kv_cache"] == {"inputs": 4, "outputs": 4}
    ports = analyze(model.programs["decode"]).kv_cache
    assert {(p.name, p.layer, p.kind) for p in ports.inputs} == {
        ("past_key_0", 0, "key"), ("past_value_0", 0, "value"), ("past_key_1", 1, "key"), ("past_value_1", 1, "value")}
    assert decode["blocks"] == 2 and decode["token_axis"] == 1
    attn = decode["detail"]["attention"][0]
    assert (attn["heads"], attn["kv_heads"]) == (4, 2)


def test_decode_step_takes_any_number_of_new_tokens(tiny_decoder):
    decode = load(tiny_decoder).programs["decode"]
    assert all(isinstance(d, str) for d in decode.input_specs()[0]["shape"])  # batch and n symbolic
    past = {k: v[:1] for k, v in decode.example_inputs.items() if k.startswith("past_")}
    length = past["past_key_0"].shape[2]
    out = decode.run({"input_ids": torch.tensor([[5]]), "attention_mask": torch.ones(1, length + 1, dtype=torch.long),
                      "position_ids": torch.tensor([[length]]), **past})
    assert out["logits"].shape == (1, 1, 300) and out["present_key_0"].shape[2] == length + 1


def test_single_layer_model():
    import transformers as tf

    from tests.conftest import SMALL, export_text

    model = tf.BertModel(tf.BertConfig(vocab_size=300, **{**SMALL, "num_hidden_layers": 1}))
    s = analyze(Program(export_text(model))).summary()
    assert (s["blocks"], s["attention_sites"], s["token_axis"]) == (1, 1, 1)
    assert s["detail"]["blocks"][0]["path"].endswith("layer.0")
