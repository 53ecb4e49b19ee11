"""Loading accepts torch.export archives and refuses everything else with one clear line."""
import dataclasses
import io
import json
import os
import pickle
import subprocess
import sys
import typing
import zipfile

import pytest
import torch
from torch.utils import _pytree as pytree

from skimformer import UserError, load


def test_loads_pt2_and_pt_with_example_inputs(exported, tmp_path):
    path = exported("bert")
    model = load(path)
    program = model.programs["model"]
    assert program.input_names == ["input_ids", "attention_mask"]
    assert program.output_names == ["last_hidden_state"]
    assert program.example_inputs["input_ids"].shape == (2, 12)
    alias = tmp_path / "same.pt"
    alias.write_bytes(path.read_bytes())
    assert load(alias).programs["model"].input_names == program.input_names


def test_sizes_parsed_once_read_as_torch_reads_them(tiny_decoder):
    """Each size text is parsed once per program: the decode program's symbolic shapes and ranges
    are those torch's own reader gives."""
    path = tiny_decoder / "decode.pt2"
    ours = load(tiny_decoder).programs["decode"].ep
    theirs = torch.export.load(str(path))

    def shapes(ep):
        return [(n.name, str(getattr(n.meta.get("val"), "shape", n.meta.get("val")))) for n in ep.graph.nodes]

    assert shapes(ours) == shapes(theirs)
    symbols = {str(k): (v.lower, v.upper) for k, v in theirs.range_constraints.items() if k.is_Symbol}
    assert {str(k): (v.lower, v.upper) for k, v in ours.range_constraints.items()} == symbols


def _refused(path, *words):
    with pytest.raises(UserError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


def test_missing_file(tmp_path):
    _refused(tmp_path / "nope.pt2", "no such file")


def test_random_bytes(tmp_path):
    p = tmp_path / "random.pt2"
    p.write_bytes(bytes(range(256)) * 20)
    _refused(p, "not a torch.export archive", "torch.export.save")


def test_truncated_archive(exported, tmp_path):
    data = exported("bert").read_bytes()
    p = tmp_path / "cut.pt2"
    p.write_bytes(data[: len(data) // 2])
    _refused(p, "damaged archive")


def test_state_dict(tmp_path):
    p = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, p)
    _refused(p, "torch.save file", "torch.export.export")


def test_plain_pickle(tmp_path):
    p = tmp_path / "obj.pt"
    p.write_bytes(pickle.dumps({"a": 1}))
    _refused(p, "pickle")


def test_torchscript(tmp_path):
    p = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), p)
    _refused(p, "TorchScript", "torch.export.export")


def test_zip_that_is_not_an_archive(tmp_path):
    p = tmp_path / "other.pt2"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("hello.txt", "hi")
    _refused(p, "not a torch.export archive")


def test_folder_without_programs(tmp_path):
    _refused(tmp_path, "prefill.pt2")


class _Payload:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_pickled_code_inside_an_archive_is_not_executed(exported, tmp_path):
    """Swap a weight for a pickle that would run a command; loading must refuse, not run it."""
    global MARKER
    MARKER = tmp_path / "pwned"
    src = exported("bert")
    evil = tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save(_Payload(), payload)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(evil, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("weights/model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                target = first["path_name"]
                data = json.dumps(config).encode()
            zout.writestr(item, data)
    with zipfile.ZipFile(evil) as z:
        names = z.namelist()
    weight_entry = next(n for n in names if n.endswith(f"weights/{target}"))
    rebuilt = tmp_path / "evil2.pt2"
    with zipfile.ZipFile(evil) as zin, zipfile.ZipFile(rebuilt, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, payload.getvalue() if item.filename == weight_entry else zin.read(item.filename))
    with pytest.raises(UserError):
        load(rebuilt)
    assert not MARKER.exists()


# Programs exported straight from a library model return the library's own container (a
# transformers ModelOutput), which a fresh process has not registered with torch's pytree.

OUTPUT_TYPE = "transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"


@pytest.fixture(scope="module")
def model_output_bert(tmp_path_factory):
    """A tiny BertModel exported as it comes (kwargs in, ModelOutput out): (path, inputs, eager outputs)."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)
    model = tf.BertModel(config).eval()
    inputs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    ep = torch.export.export(model, (), kwargs=inputs)
    path = tmp_path_factory.mktemp("model_output") / "bert.pt2"
    torch.export.save(ep, path)
    with torch.no_grad():
        eager = dict(model(**inputs))
    return path, inputs, eager


def _edit_program(src, dst, edit):
    """Copy the archive `src` to `dst` with `edit(graph_module_json)` applied to its program."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if "/models/" in item.filename and item.filename.endswith(".json"):
                program = json.loads(data)
                edit(program["graph_module"])
                data = json.dumps(program).encode()
            zout.writestr(item, data)
    return dst


def _edit_out_spec(src, dst, edit):
    """Copy the archive with `edit(root_node)` applied to its serialized output spec."""
    def apply(graph_module):
        signature = graph_module["module_call_graph"][0]["signature"]
        protocol, root = json.loads(signature["out_spec"])
        edit(root)
        signature["out_spec"] = json.dumps([protocol, root])
    return _edit_program(src, dst, apply)


def test_model_output_loads_in_a_fresh_process(model_output_bert, tmp_path):
    """The loader imports transformers' output module itself; outputs keep their field names."""
    path, inputs, eager = model_output_bert
    script = (
        "import sys, torch\n"
        "from torch.utils import _pytree as pytree\n"
        "from skimformer import load\n"
        f"assert {OUTPUT_TYPE!r} not in pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE, 'registered before loading'\n"
        "program = load(sys.argv[1]).programs['model']\n"
        "inputs = torch.load(sys.argv[2], weights_only=True)\n"
        "container = program.ep.call_spec.out_spec.type\n"
        "print(f'{container.__module__}.{container.__name__}')\n"
        "print(' '.join(program.input_names), '->', ' '.join(program.output_names))\n"
        "torch.save(program.run(inputs), sys.argv[3])\n")
    torch.save(inputs, tmp_path / "inputs.pt")
    run = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert lines[0] == OUTPUT_TYPE
    assert lines[1] == "input_ids attention_mask -> last_hidden_state pooler_output"
    outputs = torch.load(tmp_path / "out.pt", weights_only=True)
    assert list(outputs) == ["last_hidden_state", "pooler_output"]
    for name, value in outputs.items():
        torch.testing.assert_close(value, eager[name])


def test_container_of_an_absent_library_loads_as_a_dict(model_output_bert, tmp_path):
    path, inputs, eager = model_output_bert

    def rename(root):
        assert root["type"] == OUTPUT_TYPE
        root["type"] = "nolib.Outputs"

    program = load(_edit_out_spec(path, tmp_path / "nolib.pt2", rename)).programs["model"]
    assert program.ep.call_spec.out_spec.type is dict
    assert program.output_names == ["last_hidden_state", "pooler_output"]
    for name, value in program.run(inputs).items():
        torch.testing.assert_close(value, eager[name])


@dataclasses.dataclass
class _Pair:
    first: torch.Tensor
    missing: torch.Tensor | None
    second: torch.Tensor


class _Out(typing.NamedTuple):
    logits: torch.Tensor
    pair: _Pair


pytree.register_dataclass(_Pair, serialized_type_name="skimformer_tests.Pair")
pytree._register_namedtuple(_Out, serialized_type_name="skimformer_tests.Out")


class _ReturnsContainers(torch.nn.Module):
    def forward(self, x):
        return _Out(x + 1, _Pair(x * 2, None, x - 1))


def test_dataclass_and_namedtuple_of_an_absent_library_keep_their_field_names(tmp_path):
    """Registered dataclasses and namedtuples list their fields in the file; those name the outputs."""
    saved = tmp_path / "containers.pt2"
    torch.export.save(torch.export.export(_ReturnsContainers(), (torch.ones(3),)), saved)

    def rename(graph_module):
        text = json.dumps(graph_module).replace("skimformer_tests.", "nolib.")
        graph_module.clear()
        graph_module.update(json.loads(text))

    program = load(_edit_program(saved, tmp_path / "nolib.pt2", rename)).programs["model"]
    assert program.output_names == ["logits", "pair.first", "pair.second"]
    outputs = program.run({"x": torch.ones(3)})
    assert [v.tolist() for v in outputs.values()] == [[2.0] * 3, [2.0] * 3, [0.0] * 3]


def test_an_enum_from_a_module_that_is_not_installed_is_not_imported(model_output_bert, tmp_path, monkeypatch):
    """torch rebuilds enums in a spec by importing the module the file names; only installed ones may be."""
    (tmp_path / "skim_planted.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def plant(root):
        root["type"] = "builtins.dict"
        root["context"] = json.dumps([{"__enum__": True, "fqn": "skim_planted:E", "name": "A"}, "pooler_output"])

    _refused(_edit_out_spec(model_output_bert[0], tmp_path / "enum.pt2", plant), "skim_planted", "not an installed package")
    assert not (tmp_path / "imported").exists()
