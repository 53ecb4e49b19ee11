"""The aotinductor backend: AOTInductor packages of rewritten programs, checked against the
programs on other sizes than their examples, through generation, and run with torch alone.

Each program takes 10-20 s to compile on 2 cores, so the builds are few (a pruned encoder, a
KV-quantized decoder, an early-exit decode program) and marked slow."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._inductor import config as inductor_config

from skimformer import UserError, load, optimize
from skimformer.backends import aotinductor
from skimformer.backends.generation import generate
from skimformer.backends.registry import checked_backend
from skimformer.cli.main import main
from skimformer.ir import Program
from tests.decoding import assert_runs_both_branches_like, exit_decode_taking_both_branches, torch_runner

KV_QUANT = "kv-quant(bits=4, group=4, residual=4)"  # quantizes the zoo's 16-token prompts at once
NO_COMPILER = {"cpp.cxx": (None, "/nonexistent/g++")}  # inductor's compiler search finds nothing


def _compiler_found() -> bool:
    try:
        aotinductor.require()
    except UserError:
        return False
    return True


needs_compiler = pytest.mark.skipif(not _compiler_found(), reason="no C++ compiler for inductor's CPU code")


@pytest.fixture(scope="module")
def pruned_encoder(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "bert"
    return optimize(exported("bert"), passes="prune(keep=0.5, at=[0])", backend="aotinductor", output=out)


@pytest.fixture(scope="module")
def quantized_decoder(one_layer_decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("aoti") / "llama"
    return optimize(one_layer_decoder, passes=KV_QUANT, backend="aotinductor", output=out)


def test_require_refuses_without_a_cpp_compiler():
    with inductor_config.patch(NO_COMPILER), pytest.raises(UserError, match=r"no C\+\+ compiler: install g\+\+") as e:
        checked_backend("aotinductor")
    assert "\n" not in str(e.value)


def test_the_command_exits_2_and_writes_nothing_without_a_compiler(exported, tmp_path, capsys):
    with inductor_config.patch(NO_COMPILER):
        code = main(["optimize", str(exported("bert")), "-o", str(tmp_path / "eng"), "--backend", "aotinductor"])
    err = capsys.readouterr().err
    assert code == 2 and "C++ compiler" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_options_are_refused():
    with pytest.raises(UserError, match="takes no options"):
        checked_backend("aotinductor", {"dialect": "torch"})


class _Branchy(torch.nn.Module):
    def forward(self, x):
        return {"y": torch.cond(x.sum() > 0, lambda t: t + 1, lambda t: t - 1, (x,))}


def test_a_program_inductor_cannot_compile_is_refused_naming_its_construct(tmp_path, monkeypatch):
    ep = torch.export.export(_Branchy(), (torch.randn(2, 3),))
    next(n for n in ep.graph.nodes if n.target is torch.ops.higher_order.cond).meta["skim"] = "early-exit"

    def fails(*args, **kwargs):
        raise RuntimeError("C++ compile error\nwith pages of context")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fails)
    with pytest.raises(UserError) as e:
        aotinductor.lower(Program(ep), tmp_path / "model.aoti.pt2")
    assert str(e.value) == ("AOTInductor could not compile the model program (it holds torch.cond inserted by "
                            "early-exit): C++ compile error; build it with --backend onnxruntime instead")


@pytest.mark.slow
@needs_compiler
def test_pruned_encoder_matches_its_program_at_other_sizes(pruned_encoder):
    folder = pruned_encoder.folder
    assert sorted(p.name for p in folder.iterdir()) == [
        "example_inputs.npz", "manifest.json", "model.aoti.pt2", "program.pt2", "report.json", "report.md"]
    report = json.loads((folder / "report.json").read_text())
    assert report["backend"] == "aotinductor" and report["parity"]["ok"] and report["passes"][0]["name"] == "prune"
    program = load(folder / "program.pt2").programs["model"]
    g = torch.Generator().manual_seed(0)
    for batch, n in [(3, 9), (1, 1), (2, 30)]:
        mask = torch.ones(batch, n, dtype=torch.long)
        mask[-1, n // 2 + 1:] = 0
        feeds = {"input_ids": torch.randint(3, 300, (batch, n), generator=g), "attention_mask": mask}
        want = program.run(feeds)["last_hidden_state"].numpy()
        got = pruned_encoder.run(feeds)["last_hidden_state"]
        assert got.shape == want.shape == (batch, n, 64)
        np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(UserError, match="input input_ids (is int32, but this engine takes int64|must be int64 with 2 dimensions, not int32)"):
        pruned_encoder.run({"input_ids": np.ones((1, 4), np.int32), "attention_mask": np.ones((1, 4), np.int64)})


@pytest.mark.slow
@needs_compiler
def test_quantized_decoder_generates_like_its_programs(quantized_decoder):
    folder = quantized_decoder.folder
    assert {"prefill.aoti.pt2", "decode.aoti.pt2"} <= {p.name for p in folder.iterdir()}
    reference = torch_runner(load(folder))
    # 9 new tokens from a 6-token prompt: the cache grows across two quantization groups
    prompt = [[5, 9, 14, 7, 3, 22]]
    got = quantized_decoder.generate(prompt, max_new_tokens=9)
    assert got.tolist() == generate(reference, prompt, 9).ids.tolist()
    ids = np.array([[0, 0, 0, 5, 9, 14], [7, 3, 11, 20, 4, 8]])
    mask = np.array([[0, 0, 0, 1, 1, 1], [1] * 6])
    got = quantized_decoder.generate(ids, max_new_tokens=5, attention_mask=mask)
    assert got.tolist() == generate(reference, ids, 5, mask).ids.tolist()


@pytest.mark.slow
@needs_compiler
def test_a_package_runs_with_torch_alone(quantized_decoder, tmp_path):
    """Loaded and run in a fresh interpreter where skimformer cannot be imported, fed by the names
    in the package's own metadata: skim ops were decomposed and nothing else is needed."""
    folder = quantized_decoder.folder
    script = (
        "import json, sys; sys.modules['skimformer'] = None\n"
        "import numpy as np, torch\n"
        "from torch._inductor import aoti_load_package\n"
        "model = aoti_load_package(sys.argv[1])\n"
        "meta = model.get_metadata()\n"
        "feeds = np.load(sys.argv[2])\n"
        "flat = [torch.from_numpy(feeds['decode.' + i['name']]) for i in json.loads(meta['skimformer.inputs'])]\n"
        "names = [o['name'] for o in json.loads(meta['skimformer.outputs'])]\n"
        "np.savez(sys.argv[3], **{n: t.numpy() for n, t in zip(names, model.loader.run(flat))})\n")
    result = subprocess.run([sys.executable, "-I", "-c", script, str(folder / "decode.aoti.pt2"),
                             str(folder / "example_inputs.npz"), str(tmp_path / "out.npz")],
                            cwd=tmp_path, env={"PYTHONPATH": ""}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    program = load(folder).programs["decode"]
    want = program.run(program.example_inputs)
    with np.load(tmp_path / "out.npz") as got:
        assert sorted(got.files) == sorted(want)
        assert any("_scale_" in name for name in got.files)  # the quantized cache's companions
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value.numpy(), atol=1e-4, err_msg=name)
    blocked = subprocess.run([sys.executable, "-I", "-c", script.splitlines()[0] + "\nimport skimformer"],
                             cwd=tmp_path, env={"PYTHONPATH": ""}, capture_output=True, text=True)
    assert "import of skimformer halted" in blocked.stderr  # the block above is real


@pytest.mark.slow
@needs_compiler
def test_an_exit_compiles_to_control_flow_that_takes_both_branches(tiny_decoder, tmp_path):
    decode, feeds = exit_decode_taking_both_branches(tiny_decoder)
    aotinductor.lower(decode, tmp_path / "decode.aoti.pt2")
    runner = aotinductor.Runner(tmp_path / "decode.aoti.pt2")
    assert runner.output_names == decode.output_names and "exit_layer" in runner.output_names
    assert_runs_both_branches_like(runner.run, decode, feeds)
