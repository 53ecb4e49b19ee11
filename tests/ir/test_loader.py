"""Loading accepts torch.export archives and refuses everything else with one clear line."""
import io
import json
import pickle
import zipfile

import pytest
import torch

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
