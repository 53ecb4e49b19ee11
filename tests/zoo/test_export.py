"""`skimformer export` conventions (DESIGN.md): names, examples, dynamic shapes, decode continuing prefill, errors."""
import json

import pytest
import torch
import transformers as tf

from skimformer.zoo import build_model, export_pretrained, export_zoo, hf_export, is_causal_lm
from skimformer.zoo.builders import CONFIGS

TINY = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
LLAMA = dict(TINY, num_key_value_heads=2)
CACHE = ["past_key_0", "past_value_0", "past_key_1", "past_value_1"]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """`zoo(family)` -> the folder `export_zoo` wrote for the tiny model (exported once per module)."""
    root, done = tmp_path_factory.mktemp("zoo"), {}

    def get(family):
        if family not in done:
            export_zoo(family, root / family)
            done[family] = root / family
        return done[family]

    return get


def _load(path):
    ep = torch.export.load(path)
    return ep, dict(zip(ep.graph_signature.user_inputs, ep.example_inputs[0]))


def _output_names(ep):
    return list(ep.call_spec.out_spec.context)


def _run(ep, feeds):
    with torch.no_grad():
        return ep.module()(*(feeds[name] for name in ep.graph_signature.user_inputs))


def _placeholder_shapes(ep):
    return {n.name: n.meta["val"].shape for n in ep.graph.nodes if n.name in ep.graph_signature.user_inputs}


# -- encoders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family,inputs,outputs", [
    ("bert", ["input_ids", "attention_mask", "token_type_ids"], ["last_hidden_state", "pooler_output"]),
    ("vit", ["pixel_values"], ["last_hidden_state", "pooler_output"]),
])
def test_encoder_convention(zoo, family, inputs, outputs):
    folder = zoo(family)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.pt2"]
    ep, ex = _load(folder / "model.pt2")
    assert list(ep.graph_signature.user_inputs) == inputs
    assert _output_names(ep) == outputs
    if family == "bert":
        assert ex["input_ids"].shape == (2, 16) and int(ex["input_ids"].min()) >= 3
        assert ex["attention_mask"][0].all() and ex["attention_mask"][1].tolist() == [1] * 12 + [0] * 4
        assert not ex["token_type_ids"].any()
    else:
        assert ex["pixel_values"].shape == (2, 3, 32, 32)


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_encoder_batch_and_sequence_are_dynamic(zoo, family):
    ep, _ = _load(zoo(family) / "model.pt2")
    model = build_model(family)
    if family == "vit":
        feeds = {"pixel_values": torch.randn(5, 3, 32, 32)}
    else:
        feeds = {"input_ids": torch.randint(3, 300, (3, 7)), "attention_mask": torch.ones(3, 7, dtype=torch.long),
                 "token_type_ids": torch.zeros(3, 7, dtype=torch.long)}
    with torch.no_grad():
        want = model(**feeds).last_hidden_state
    torch.testing.assert_close(_run(ep, feeds)["last_hidden_state"], want, atol=1e-5, rtol=1e-4)


def test_task_head_comes_first(tmp_path):
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **TINY))
    hf_export.export_model(model, tmp_path / "cls", batch=1, seq_len=8)
    ep, ex = _load(tmp_path / "cls" / "model.pt2")
    assert _output_names(ep)[0] == "logits" and _run(ep, ex)["logits"].shape == (1, 3)


# -- decoders -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decoder_convention(zoo, family):
    folder = zoo(family)
    assert {"prefill.pt2", "decode.pt2", "config.json"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    prefill, pex = _load(folder / "prefill.pt2")
    decode, dex = _load(folder / "decode.pt2")
    assert list(prefill.graph_signature.user_inputs) == hf_export.DECODER_INPUTS
    assert list(decode.graph_signature.user_inputs) == hf_export.DECODER_INPUTS + CACHE
    present = [name.replace("past", "present") for name in CACHE]
    assert _output_names(prefill) == _output_names(decode) == ["logits", *present]
    # The prompt: row 1 left-padded, positions counting real tokens only.
    assert pex["attention_mask"][1].tolist() == [0] * 4 + [1] * 12
    assert pex["position_ids"][1].tolist() == [0] * 5 + list(range(1, 12))
    # The decode example continues that prompt from its real cache.
    n = hf_export.DECODE_TOKENS
    assert dex["input_ids"].shape == (2, n)
    assert torch.equal(dex["attention_mask"], torch.cat([pex["attention_mask"], torch.ones(2, n, dtype=torch.long)], 1))
    assert dex["position_ids"][1].tolist() == [12, 13, 14][:n]
    cache = _run(prefill, pex)
    for name in CACHE:
        torch.testing.assert_close(dex[name], cache[name.replace("past", "present")])


def test_decode_shares_one_past_size(zoo):
    decode, _ = _load(zoo("llama") / "decode.pt2")
    shapes = _placeholder_shapes(decode)
    past = {str(shapes[name][2]) for name in CACHE}
    assert len(past) == 1
    assert str(shapes["attention_mask"][1]) == str(shapes["past_key_0"][2] + shapes["input_ids"][1])
    assert all(isinstance(shapes["input_ids"][i], torch.SymInt) for i in (0, 1))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_continues_prefill_exactly(zoo, family):
    """Prefill 6 tokens, decode 1 then 2 more: the same logits as transformers on all 9 at once."""
    prefill, _ = _load(zoo(family) / "prefill.pt2")
    decode, _ = _load(zoo(family) / "decode.pt2")
    ids = torch.randint(3, 300, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :2] = 0  # a left-padded row
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = build_model(family)(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    state = _run(prefill, {"input_ids": ids[:, :6], "attention_mask": mask[:, :6], "position_ids": pos[:, :6]})
    logits = [state["logits"]]
    for start, stop in [(6, 7), (7, 9)]:
        feeds = {"input_ids": ids[:, start:stop], "attention_mask": mask[:, :stop], "position_ids": pos[:, start:stop],
                 **{name: state[name.replace("past", "present")] for name in CACHE}}
        state = _run(decode, feeds)
        logits.append(state["logits"])
    got = torch.cat(logits, 1)
    torch.testing.assert_close(got[1:], want[1:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 2:], want[0, 2:], atol=1e-4, rtol=1e-4)  # padded queries are never read
    assert state["present_key_0"].shape[2] == 9


def test_single_token_generation_from_a_one_token_prompt(zoo):
    """Batch 1, past 1, one new token: the shapes of the first steps of `generate`."""
    prefill, _ = _load(zoo("llama") / "prefill.pt2")
    decode, _ = _load(zoo("llama") / "decode.pt2")
    one = torch.ones(1, 1, dtype=torch.long)
    state = _run(prefill, {"input_ids": one * 7, "attention_mask": one, "position_ids": one * 0})
    for step in (1, 2):
        state = _run(decode, {"input_ids": one * 9, "attention_mask": torch.ones(1, step + 1, dtype=torch.long),
                              "position_ids": one * step, **{n: state[n.replace("past", "present")] for n in CACHE}})
    assert state["logits"].shape == (1, 1, 300) and state["present_value_1"].shape == (1, 2, 3, 16)


# -- folders ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    """A transformers folder with weights and tokenizer files, as save_pretrained writes it."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(1)
    tf.LlamaForCausalLM(tf.LlamaConfig(**LLAMA)).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    (folder / "vocab.txt").write_text("a\n")
    return folder


def test_folder_with_weights(llama_folder, tmp_path):
    files = export_pretrained(llama_folder, tmp_path / "out", batch=1, seq_len=5)
    assert [f.name for f in files] == ["prefill.pt2", "decode.pt2"]
    assert {"tokenizer.json", "vocab.txt", "config.json"} <= {p.name for p in (tmp_path / "out").iterdir()}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    weights = torch.export.load(files[0]).state_dict
    saved = tf.LlamaForCausalLM.from_pretrained(llama_folder).state_dict()
    assert torch.equal(weights["model.model.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    ex = dict(zip(hf_export.DECODER_INPUTS, torch.export.load(files[0]).example_inputs[0]))
    assert ex["input_ids"].shape == (1, 5)


def test_config_only_folder_gives_seeded_random_weights(tmp_path):
    config = tf.BertConfig(**TINY)
    config.architectures = ["BertModel"]
    (tmp_path / "cfg").mkdir()
    config.to_json_file(tmp_path / "cfg" / "config.json")
    files = export_pretrained(tmp_path / "cfg", tmp_path / "out")
    torch.manual_seed(0)
    want = tf.BertModel(config).state_dict()["embeddings.word_embeddings.weight"]
    assert torch.equal(torch.export.load(files[0]).state_dict["model.embeddings.word_embeddings.weight"], want)


def test_static_export(tmp_path):
    export_zoo("bert", tmp_path / "bert", static=True, batch=3, seq_len=10)
    ep, _ = _load(tmp_path / "bert" / "model.pt2")
    assert [tuple(s) for s in _placeholder_shapes(ep).values()] == [(3, 10)] * 3
    export_zoo("llama", tmp_path / "llama", static=True, batch=1, seq_len=6)
    decode, dex = _load(tmp_path / "llama" / "decode.pt2")
    shapes = _placeholder_shapes(decode)
    assert all(isinstance(d, int) for s in shapes.values() for d in s)
    assert (tuple(shapes["input_ids"]), tuple(shapes["past_key_0"])) == ((1, 1), (1, 2, 6, 16))


# -- errors -------------------------------------------------------------------------------------

def _unknown_family(path):
    (path / "config.json").write_text('{"model_type": "no-such-family"}')
    return path


def _t5_folder(path):
    path.mkdir()
    tf.T5Config(vocab_size=300, d_model=32, num_layers=1, num_heads=2).to_json_file(path / "config.json")
    return path


@pytest.mark.parametrize("setup,words", [
    (lambda p: p / "missing", "no such folder"),
    (lambda p: p, "has no config.json"),
    (_unknown_family, "cannot be read by transformers"),
    (lambda p: _t5_folder(p / "t5"), "encoder-decoder"),
])
def test_user_errors_are_value_errors(tmp_path, setup, words):
    with pytest.raises(ValueError, match=words):
        export_pretrained(setup(tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_sizes_are_refused(tmp_path):
    with pytest.raises(ValueError, match="seq_len >= 2"):
        export_zoo("bert", tmp_path / "out", seq_len=1)


def test_existing_output_is_refused_then_forced(llama_folder, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine").write_text("keep")
    with pytest.raises(ValueError, match="--force"):
        export_pretrained(llama_folder, tmp_path / "out")
    assert (tmp_path / "out" / "mine").read_text() == "keep"
    export_zoo("vit", tmp_path / "out", force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.pt2"]


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    def differ(label, *args):
        raise hf_export.VerificationError(f"{label} differs")

    monkeypatch.setattr(hf_export, "_verify", differ)
    with pytest.raises(hf_export.VerificationError):
        export_zoo("vit", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# -- kinds and builders -------------------------------------------------------------------------

@pytest.mark.parametrize("cls,causal", [
    (tf.GPT2LMHeadModel, True), (tf.LlamaForCausalLM, True), (tf.BertModel, False),
    (tf.BertForSequenceClassification, False), (tf.ViTModel, False),
])
def test_causal_lm_detection(cls, causal):
    assert is_causal_lm(cls.__new__(cls)) is causal


def test_zoo_families_and_sizes():
    with pytest.raises(ValueError, match="families: bert, gpt2, llama, vit"):
        build_model("t5")
    vit, _ = CONFIGS[("vit", "realistic")]()
    bert, _ = CONFIGS[("bert", "realistic")]()
    gpt2, _ = CONFIGS[("gpt2", "realistic")]()
    llama, _ = CONFIGS[("llama", "realistic")]()
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_hidden_layers) == (224, 16, 768, 12)
    assert (bert.hidden_size, bert.num_hidden_layers) == (768, 12)
    assert (gpt2.n_embd, gpt2.n_layer) == (768, 12)
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_key_value_heads) == (768, 12, 4)
    tiny, _ = CONFIGS[("vit", "tiny")]()
    assert (tiny.image_size, tiny.patch_size, tiny.num_hidden_layers, tiny.hidden_size) == (32, 8, 2, 64)


@pytest.mark.parametrize("config,cls", [
    (tf.GPT2Config(), tf.AutoModelForCausalLM),
    (tf.LlamaConfig(), tf.AutoModelForCausalLM),
    (tf.BertConfig(), tf.AutoModel),  # BERT has a causal-LM head too, but is an encoder
    (tf.ViTConfig(), tf.AutoModel),
    (tf.BertConfig(architectures=["BertForMaskedLM"]), tf.BertForMaskedLM),
])
def test_class_from_config(config, cls):
    assert hf_export._model_class(config) is cls
