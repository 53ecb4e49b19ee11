"""What reaches the user's terminal, and two runs writing one folder: refusals are one line that
names the cause, library chatter stays out unless --verbose, and one of two writers wins whole."""
import io
import json
import os
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from skimformer.atomic import atomic_folder
from skimformer.backends.engine import MANIFEST, Engine
from skimformer.errors import UserError, cause

BIN = Path(sys.executable).parent
LIMIT = 200  # a refusal's length, beside the paths it names


class _Unsafe:
    """A pickle that names a global weights-only loading refuses."""

    def __reduce__(self):
        return (print, ("unpickled",))


def _with_pickled_weight(src: Path, dst: Path) -> Path:
    """A copy of the archive whose first weight is a pickled Python object instead of raw bytes."""
    payload = io.BytesIO()
    torch.save(_Unsafe(), payload)
    with zipfile.ZipFile(src) as z:
        entries = {item.filename: z.read(item.filename) for item in z.infolist()}
    config_name = next(n for n in entries if n.endswith("weights/model_weights_config.json"))
    config = json.loads(entries[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    entries[config_name] = json.dumps(config).encode()
    entries[next(n for n in entries if n.endswith(f"weights/{first['path_name']}"))] = payload.getvalue()
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return dst


def _cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "skimformer", *map(str, argv)], capture_output=True, text=True)


def _one_line_refusal(result: subprocess.CompletedProcess, *paths) -> str:
    """The one line a refused run printed besides its progress; at most LIMIT characters and the paths."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("[skimformer")]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert len(lines[0]) <= LIMIT + sum(len(str(p)) for p in paths), lines[0]
    return lines[0]


def test_a_pickled_weight_is_refused_in_one_line_naming_its_global(exported, tmp_path):
    path = _with_pickled_weight(exported("bert"), tmp_path / "pickled.pt2")
    line = _one_line_refusal(_cli("inspect", path), path)
    assert "GLOBAL print" in line and "torch.export.save" in line
    assert "weights_only" not in line.replace(str(path), "")  # torch's advice to load the file unsafely is not repeated


@pytest.mark.parametrize("text, want", [
    ("Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument.\n\n\n"
     "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\n"
     "Check the documentation of torch.load to learn more about types accepted by default with weights_only https://x.",
     "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."),
    ("Weights only load failed. This file can still be loaded, to do so you have two options, do those steps only if "
     "you trust the source of the checkpoint. \n\t(1) Re-running `torch.load` with `weights_only` set to `False`\n\t"
     "(2) Alternatively, to load with `weights_only=True` please check the recommended steps.\n\t"
     "WeightsUnpickler error: Unsupported global: GLOBAL a.B was not an allowed global by default. Please use "
     "`torch.serialization.add_safe_globals([a.B])` to allowlist this global if you trust this class/function.",
     "Unsupported global: GLOBAL a.B was not an allowed global by default."),
    ("Weights only load failed. a.B must be imported to load\n Re-running `torch.load` with `weights_only` ...",
     "a.B must be imported to load"),
    ("first line\nsecond line", "first line"),
    ("", "RuntimeError"),
])
def test_cause_is_the_first_line_that_is_not_advice(text, want):
    assert cause(RuntimeError(text)) == want


def test_cause_is_cut_to_its_limit():
    assert cause(RuntimeError("x" * 500), limit=50) == "x" * 47 + "..."


def test_library_warnings_show_only_with_verbose(exported):
    """A library that warns and logs while a program loads (torch's LeafSpec FutureWarning,
    transformers' advice) is heard only with --verbose."""
    chatty = ("import logging, sys, warnings, torch\n"
              "load = torch.export.load\n"
              "def chatty(*args, **kwargs):\n"
              "    warnings.warn('`isinstance(treespec, LeafSpec)` is deprecated', FutureWarning)\n"
              "    logging.getLogger('transformers.modeling_utils').warning('[transformers] some advice')\n"
              "    return load(*args, **kwargs)\n"
              "torch.export.load = chatty\n"
              "from skimformer.cli.main import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    run = lambda *flags: subprocess.run([sys.executable, "-c", chatty, *flags, "inspect", str(exported("bert"))],
                                        capture_output=True, text=True)
    quiet, verbose = run(), run("--verbose")
    assert quiet.returncode == verbose.returncode == 0
    assert quiet.stderr == "", quiet.stderr
    assert "FutureWarning" in verbose.stderr and "some advice" in verbose.stderr


def test_a_folder_being_written_is_refused_to_a_second_writer(tmp_path):
    out = tmp_path / "engine"
    inside, release = threading.Event(), threading.Event()

    def first():
        with atomic_folder(out, replace=False) as tmp:
            (tmp / "first").touch()
            inside.set()
            release.wait(30)

    writer = threading.Thread(target=first)
    writer.start()
    assert inside.wait(30)
    try:
        with pytest.raises(UserError, match=f"being written by another run \\(pid {os.getpid()}\\)"):
            with atomic_folder(out, replace=False):
                pass
    finally:
        release.set()
        writer.join()
    assert sorted(p.name for p in out.iterdir()) == ["first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no lock or temporary folder left


def test_a_destination_that_appears_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "engine"
    with pytest.raises(UserError, match="appeared while"):
        with atomic_folder(out, replace=False) as tmp:
            (tmp / "mine").touch()
            out.mkdir()
            (out / "theirs").touch()
    assert sorted(p.name for p in out.iterdir()) == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_a_lock_left_by_a_dead_run_does_not_block(tmp_path):
    out = tmp_path / "engine"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".engine.lock").write_text(dead.stdout.strip())
    with atomic_folder(out, replace=False) as tmp:
        (tmp / "done").touch()
    assert (out / "done").exists() and not (tmp_path / ".engine.lock").exists()


def test_two_optimize_runs_into_one_folder_one_wins_whole(exported, tmp_path):
    out = tmp_path / "engine"
    argv = [BIN / "skimformer", "optimize", exported("bert"), "-o", out]
    runs = [subprocess.Popen(list(map(str, argv)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]
    results = [subprocess.CompletedProcess(r.args, r.wait(), *r.communicate()) for r in runs]
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    line = _one_line_refusal(next(r for r in results if r.returncode == 2), out)
    assert "another run" in line or "--force" in line
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert all((out / name).exists() for name in manifest["files"])
    engine = Engine.load(out)
    assert engine.run(engine.example_inputs())
