"""ONNX Runtime kernel selection: which fused ops the engines hold, parity with the programs
(batch > 1 with left padding), the in-place cache, quantized weights, and `--portable`."""
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from skimformer import UserError, load, optimize
from skimformer.backends.generation import CopiedCache, generate
from skimformer.backends.ort_kernels.attention import ROTARY_POSITIONS
from skimformer.backends.ort_cache import InPlaceCache
from tests.decoding import torch_runner


def op_counts(path) -> Counter:
    """Ops of an ONNX file by domain and type, those of `If` branches included."""
    counts, graphs = Counter(), [onnx.load(str(path), load_external_data=False).graph]
    while graphs:
        graph = graphs.pop()
        counts.update(f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in graph.node)
        graphs.extend(a.g for n in graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return counts


@pytest.fixture
def fused(tiny_engine):
    return tiny_engine()


@pytest.fixture
def portable(tiny_engine):
    return tiny_engine(portable=True)


def padded_prompt(rows=3, length=9, pad=(0, 4, 2)):
    ids = np.random.default_rng(1).integers(3, 300, (rows, length))
    mask = np.ones_like(ids)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    return ids, mask


def test_decoder_engines_hold_fused_attention_and_norms(fused):
    layers = 2  # the zoo's tiny Llama
    for role in ("prefill", "decode"):
        ops = op_counts(fused.folder / f"{role}.onnx")
        assert ops["com.microsoft:GroupQueryAttention"] == layers
        assert ops["com.microsoft:SkipSimplifiedLayerNormalization"] > 0
        assert ops["Softmax"] == 0  # no unfused attention left
    report = fused.folder / "report.json"
    assert '"ok": true' in report.read_text()


def test_decode_steps_rotate_and_pack_qkv_inside_the_kernel(fused):
    """A decode step's attention reads the projections' packed output and rotates inside the
    kernel: no rotary or head-moving ops are left around it (a prefill keeps the model's own
    rotation, whose left-padded rows start at different positions)."""
    decode = onnx.load(str(fused.folder / "decode.onnx"), load_external_data=False).graph
    kernels = [n for n in decode.node if n.op_type == "GroupQueryAttention"]
    for kernel in kernels:
        attributes = {a.name: a.i for a in kernel.attribute if a.type == onnx.AttributeProto.INT}
        assert attributes["do_rotary"] == 1 and attributes.get("rotary_interleaved", 0) == 0
        assert kernel.input[1] == kernel.input[2] == ""  # key and value are packed into the query
    ops = op_counts(fused.folder / "decode.onnx")
    assert ops["Sin"] == ops["Cos"] == ops["Neg"] == ops["Transpose"] == 0
    tables = {kernel.input[7] for kernel in kernels} | {kernel.input[8] for kernel in kernels}
    assert len(tables) == 2  # one cos and one sin table, shared by the layers
    assert ops["MatMul"] == 2 * 5 + 1  # per layer: packed QKV, output, gate, up, down; then the LM head
    prefill = onnx.load(str(fused.folder / "prefill.onnx"), load_external_data=False).graph
    assert not any(a.name == "do_rotary" for n in prefill.node if n.op_type == "GroupQueryAttention"
                   for a in n.attribute)


def test_portable_engine_has_standard_ops_only(portable):
    for role in ("prefill", "decode"):
        assert not [op for op in op_counts(portable.folder / f"{role}.onnx") if ":" in op]
    assert not portable.runners["decode"].in_place_cache
    assert portable.runners["decode"].position_limit is None  # the model's own rotation: any position


def test_generation_past_the_rotary_tables_is_refused_before_it_runs(fused):
    """A kv-window engine streams past the model's context, up to the kernel's tables."""
    assert fused.runners["decode"].position_limit == ROTARY_POSITIONS
    prompt = np.arange(3, 11)[None]
    with pytest.raises(UserError, match=r"cover 32,768 positions, and this generation reaches position 32,768.*--portable"):
        fused.generate(prompt, max_new_tokens=ROTARY_POSITIONS - 6)


def test_fused_engine_matches_the_programs_on_a_left_padded_batch(tiny_decoder, fused):
    """Greedy tokens of a padded batch of three, fused engine against the programs in torch, at
    every row (real positions only: padding rows' outputs are unspecified)."""
    ids, mask = padded_prompt()
    want = generate(torch_runner(load(tiny_decoder)), ids, 12, mask).ids
    np.testing.assert_array_equal(fused.generate(ids, 12, mask), want)
    # a multi-token decode step of the batch, logits against the program
    program = load(tiny_decoder).programs["decode"]
    feeds = {k: v.numpy() for k, v in program.example_inputs.items()}
    got = fused.run(feeds, "decode")
    ref = program.run(program.example_inputs)
    np.testing.assert_allclose(got["logits"], ref["logits"].numpy(), atol=1e-4)
    np.testing.assert_allclose(got["present_key_1"], ref["present_key_1"].numpy(), atol=1e-4)


def test_the_cache_stays_in_place(fused):
    """Every decode step writes into the buffers allocated after the prefill: the same memory,
    grown by one token per step, and the tokens equal those of the copying loop."""
    assert fused.runners["decode"].in_place_cache
    ids, mask = padded_prompt()
    cache = InPlaceCache(fused.runners["prefill"], fused.runners["decode"], max_new_tokens=6)
    copied = generate(fused.run, ids, 6, mask, cache=CopiedCache(fused.run))
    in_place = generate(fused.run, ids, 6, mask, cache=cache)
    np.testing.assert_array_equal(in_place.ids, copied.ids)
    buffer = cache.buffers["past_key_0"].numpy()
    assert buffer.shape[2] == ids.shape[1] + 5  # the last token is never fed back
    # the buffer holds the copied loop's cache for every token the steps wrote (5 decode steps)
    np.testing.assert_allclose(buffer[:, :, : ids.shape[1] + 5], _final_cache(fused, ids, mask, 6)["past_key_0"],
                               atol=1e-5)
    assert cache.bytes == in_place.kv_cache_bytes > 0


def _final_cache(engine, ids, mask, steps):
    """The copying loop's cache after `steps` tokens (the last step's token is not fed)."""
    cache = CopiedCache(engine.run)
    generate(engine.run, ids, steps, mask, cache=cache)
    return cache.carried


def test_int4_weights_are_matmul_nbits_with_reported_fidelity(tiny_decoder, tmp_path):
    engine = optimize(tiny_decoder, output=tmp_path / "eng", backend_options={"weights": "int4"})
    ops = op_counts(engine.folder / "decode.onnx")
    assert ops["com.microsoft:MatMulNBits"] >= 7 and ops["com.microsoft:GroupQueryAttention"] == 2
    assert ops["MatMul"] == 0  # the tied LM head too: its weight is the embedding table, transposed
    assert ops["com.microsoft:GatherBlockQuantized"] == 1  # the embedding's lookup, in 4 bits as well
    report = (engine.folder / "report.json").read_text()
    assert '"lossy": true' in report and '"min_cosine"' in report


def test_int4_weights_quantize_a_tied_lm_head(tmp_path):
    """GPT-2's LM head is its embedding table, transposed: the exporter reads it through a
    Transpose, which ONNX Runtime's quantizer does not take; the head is a third of the weights."""
    import torch
    import transformers as tf

    from skimformer.zoo import export_model

    torch.manual_seed(0)
    export_model(tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=64, n_layer=1, n_head=4)), tmp_path / "gpt2")
    engine = optimize(tmp_path / "gpt2", output=tmp_path / "eng", backend_options={"weights": "int4"})
    ops = op_counts(engine.folder / "decode.onnx")
    assert ops["MatMul"] == ops["Gemm"] == 0  # its projections were Gemms of Conv1D weights
    assert ops["com.microsoft:MatMulNBits"] == 5  # 4 projections and the head


def test_backend_options_are_checked(tiny_decoder, tmp_path):
    with pytest.raises(UserError, match="int4"):
        optimize(tiny_decoder, output=tmp_path / "a", backend_options={"weights": "int3"})
    with pytest.raises(UserError, match="no option"):
        optimize(tiny_decoder, output=tmp_path / "b", backend_options={"fast": True})
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(UserError, match="install onnxruntime-gpu"):
            optimize(tiny_decoder, output=tmp_path / "c", backend_options={"provider": "cuda"})
    assert not any((tmp_path / name).exists() for name in "abc")


def test_the_report_says_which_execution_provider_ran(fused):
    report = (fused.folder / "report.json").read_text()
    assert f'"execution_provider": "{fused.runners["decode"].provider}"' in report
    assert fused.runners["decode"].provider in ort.get_available_providers()


@pytest.mark.parametrize("spec, fused, in_place", [
    ("prompt-prune(layer=0, keep=0.5)", {"prefill": 2, "decode": 2}, True),
    ("kv-evict(policy=snapkv, keep=0.5, window=4)", {"decode": 2}, True),
    ("self-speculate(exit=1, draft=2)", {"prefill": 2, "decode": 2, "draft": 1, "verify": 1}, True),
    ("kv-window(sink=2, window=6)", {"prefill": 2, "decode": 2}, False),
    ("kv-evict(policy=h2o, keep=0.5)", {"prefill": 2, "decode": 2}, False),
    ("early-exit(at=[0], threshold=0.2)", {"prefill": 2, "decode": 2}, False),
])
def test_pass_engines_attend_with_the_fused_kernel(tiny_engine, spec, fused, in_place):
    """Every layer of these engines' programs runs GroupQueryAttention: prompt pruning and
    prefill-time eviction leave a plain growing cache to decode on; a self-speculative engine's
    draft and verify programs each grow their layers' caches; a window and H2O's eviction gather
    the cache they return from the one the kernel grows, so their cache is not kept in place (it
    is a new, shorter tensor every step); an exit's decode step fuses the layers before its `If`
    and those inside the branch that runs them (its cache passes through the `If`, not in place).
    The engine generates what its programs do, on a prompt longer than the window and the
    eviction's budget."""
    engine = tiny_engine(spec)
    for role, layers in fused.items():
        assert op_counts(engine.folder / f"{role}.onnx")["com.microsoft:GroupQueryAttention"] == layers, role
    assert engine.runners["decode"].in_place_cache == in_place
    ids, mask = padded_prompt(rows=1, pad=(0,))
    want = generate(torch_runner(load(engine.folder)), ids, 8, mask).ids
    np.testing.assert_array_equal(engine.generate(ids, 8, mask), want)


@pytest.mark.parametrize("family, spec", [
    ("bert", None),
    ("distilbert", None),
    ("vit", "tome(r=2)"),
    ("bert", "prune(keep=0.5, at=[0])"),
])
def test_encoder_engines_attend_with_multi_head_attention(exported, tmp_path, family, spec):
    """Every layer's attention runs MultiHeadAttention, with the model's mask (a padding mask, or
    the bias of merged tokens) as its bias, and the engine computes what its program does on a
    batch of three with padding."""
    engine = optimize(exported(family), spec, output=tmp_path / "engine")
    ops = op_counts(engine.folder / "model.onnx")
    assert ops["com.microsoft:MultiHeadAttention"] == 2  # one per layer
    if spec is None or spec.startswith("tome"):  # prune's scores keep their softmax
        assert ops["Softmax"] == 0
    if family == "vit":
        feeds = {"pixel_values": np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    else:
        ids, mask = padded_prompt(rows=3, length=10, pad=(0, 0, 0))
        mask[1, 7:] = mask[2, 4:] = 0  # encoders pad on the right
        feeds = {"input_ids": ids, "attention_mask": mask}
    program = load(engine.folder / "program.pt2").programs["model"]
    want = program.run({k: torch.as_tensor(v) for k, v in feeds.items()})["last_hidden_state"].numpy()
    np.testing.assert_allclose(engine.run(feeds)["last_hidden_state"], want, atol=1e-4, rtol=1e-4)


def test_a_window_over_a_fused_qkv_model_types_the_kernel_outputs_it_reads(tmp_path):
    """GPT-NeoX splits one QKV projection into chunks and rotates a quarter of the head dim, and
    kv-window reads the grown cache the kernel returns. The exporter renames nodes when it
    decomposes a program, so the kernel's outputs are typed by the names of what it translated:
    typed by the program's own names they took the QKV chunks' shapes, and ONNX Runtime refused
    the engine (a buffer of the step's 3 tokens reused for the cache's 11)."""
    import transformers as tf

    from skimformer.zoo import export_model

    torch.manual_seed(0)
    config = tf.GPTNeoXConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=128)
    export_model(tf.GPTNeoXForCausalLM._from_config(config, attn_implementation="sdpa"), tmp_path / "neox")
    engine = optimize(tmp_path / "neox", "kv-window(sink=2, window=6)", output=tmp_path / "engine")
    assert op_counts(engine.folder / "decode.onnx")["com.microsoft:GroupQueryAttention"] == 2
    ids, mask = padded_prompt(rows=1, pad=(0,))
    want = generate(torch_runner(load(engine.folder)), ids, 8, mask).ids
    np.testing.assert_array_equal(engine.generate(ids, 8, mask), want)
