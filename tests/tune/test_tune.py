"""skimformer tune end to end on a tiny random BERT (2 blocks, 12 tokens): the resume from
trials.jsonl, the "nothing helps" answer through the CLI, and a search on a local Ray cluster.

The space is `skip` (skip-layers or skip-ffn of block 1, or nothing): the cheapest passes to
build, so each search takes seconds a trial."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from skimformer.backends.engine import Engine
from skimformer.cli.main import main
from skimformer.tuning import tune_model
from skimformer.tuning.search import Search
from skimformer.tuning.worker import Worker

BUDGET = "cosine>=0.9"


@pytest.fixture(scope="module")
def bert(exported):
    return exported("bert")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (12, 12))
    mask = np.ones_like(ids)
    mask[::4, 9:] = 0
    path = tmp_path_factory.mktemp("tune-data") / "inputs.npz"
    np.savez(path, input_ids=ids, attention_mask=mask)
    return path, {"input_ids": ids, "attention_mask": mask}


def _lines(folder):
    return [json.loads(line) for line in (folder / "trials.jsonl").read_text().splitlines()]


class Interrupted(KeyboardInterrupt):
    pass


def test_an_interrupted_search_resumes_without_running_its_trials_again(bert, data, tmp_path, monkeypatch):
    out = tmp_path / "tuned"
    finish = Search._finish

    def finish_then_interrupt(self, trial, record):
        finish(self, trial, record)
        raise Interrupted  # the user presses ^C once the first trial is in trials.jsonl

    monkeypatch.setattr(Search, "_finish", finish_then_interrupt)
    with pytest.raises(Interrupted):
        tune_model(bert, BUDGET, out, data=data[1], space="skip", trials=3)
    first = _lines(out)
    assert len(first) == 1 and not (out / "engine").exists()
    with open(out / "trials.jsonl", "a") as f:
        f.write('{"trial": 1, "state": "compl')  # and the machine died while writing the next line

    monkeypatch.setattr(Search, "_finish", finish)
    screened = []
    screen = Worker.screen
    monkeypatch.setattr(Worker, "screen", lambda self, n, c: screened.append(c.key) or screen(self, n, c))
    result = tune_model(bert, BUDGET, out, data=data[1], space="skip", trials=3)

    lines = _lines(out)
    assert lines[0] == first[0]  # kept as it was
    done_before = {f"{first[0]['pipeline']} | weights={first[0]['weights']}"}
    assert screened and not done_before & set(screened)  # its configuration was not run again
    assert len(lines) == 1 + len(screened) <= 3 and [r["trial"] for r in lines] == list(range(len(lines)))
    assert len(result.records) == len(lines)
    assert (out / "best.yaml").is_file() and Engine.load(out / "engine").roles == ["model"]


def test_nothing_within_the_budget_builds_the_unoptimized_engine_and_says_so(bert, data, tmp_path, capsys):
    out = tmp_path / "tuned"
    # No skip of a block keeps 0.99999 of the output: every candidate is pruned at the screen, no engine built.
    code = main(["tune", str(bert), "--budget", "cosine>=0.99999", "--data", str(data[0]), "--space", "skip",
                 "--trials", "3", "-o", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["chosen"] is None
    assert summary["answer"].startswith("nothing within the budget (cosine>=0.99999) is faster than the unoptimized "
                                        "engine (no measured trial was within it): the engine built is the unoptimized one")
    assert all(r["state"] == "pruned" for r in _lines(out))
    report = json.loads((out / "engine" / "report.json").read_text())
    assert report["passes"] == []
    assert "passes: []" in (out / "best.yaml").read_text()
    assert summary["held_out"]["figures"]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert [r["label"] for r in summary["front"]] == ["unoptimized"]


def test_a_gain_not_confirmed_when_timed_again_is_noise_and_the_unoptimized_engine_is_built(bert, data, tmp_path,
                                                                                            monkeypatch):
    check = Worker.check

    def slower_the_second_time(self, folder, timed=True):
        result = check(self, folder, timed)
        return {**result, "speed": 1.03, "speed_bound": 0.97} if timed else result

    monkeypatch.setattr(Worker, "check", slower_the_second_time)
    result = tune_model(bert, BUDGET, tmp_path / "tuned", data=data[1], space="skip", trials=1)
    (trial,) = result.records
    assert trial["state"] == "complete" and trial["speed_bound"] > 1.0  # skip-layers(layers=[1]) of 2 blocks
    assert result.chosen is None and result.summary["unconfirmed"]["timed_again"] == 1.03
    assert "1.03x (90% bound 0.97) timed again: timing noise): the engine built is the unoptimized one" \
        in result.summary["answer"]
    assert json.loads((tmp_path / "tuned" / "engine" / "report.json").read_text())["passes"] == []


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_a_search_on_a_local_ray_cluster_of_two_workers(bert, data, tmp_path, local_ray):
    out = tmp_path / "tuned"
    result = tune_model(bert, BUDGET, out, data=data[1], space="skip", trials=2, ray="auto", workers=2)
    lines = _lines(out)
    assert len(lines) == 2
    assert {r["worker"] for r in lines} == {0, 1}  # the round's two candidates were screened side by side
    assert local_ray.is_initialized()  # a cluster the caller started is the caller's to stop
    measured = [r for r in lines if r["state"] == "complete"]
    for r in measured:
        assert r["speed"] > 0 and r["figures"]["cosine"] >= 0.9 and r["timing"]["runs"] >= 5
    assert result.summary["held_out"]["figures"]["cosine"] >= 0.9
    assert (out / "trials.png").is_file() and Engine.load(out / "engine").roles == ["model"]


def test_more_workers_than_the_cluster_has_cpus_is_refused_before_anything_is_written(bert, data, tmp_path,
                                                                                      local_ray):
    from skimformer import UserError

    out = tmp_path / "tuned"
    with pytest.raises(UserError, match="--workers 3 with 1 thread.* needs 3 CPUs; the Ray cluster has 2"):
        tune_model(bert, BUDGET, out, data=data[1], space="skip", trials=1, ray="auto", workers=3)
    assert not out.exists() and local_ray.is_initialized()


def test_a_remote_worker_gets_the_model_and_exit_heads_as_bytes(bert, tmp_path):
    from skimformer.ir import load
    from skimformer.tuning.ray_pool import ModelFiles

    heads = tmp_path / "exit-heads.safetensors"
    heads.write_bytes(b"adapters")
    files = ModelFiles.shipped(str(bert), str(heads))  # what `--ray ADDRESS` puts in the object store
    path, aliases = files.materialize()  # what each actor does with it, on its own disk
    assert path != str(bert) and load(path).programs["model"].input_names == ["input_ids", "attention_mask"]
    (local,) = aliases.values()
    assert aliases == {str(heads): local} and open(local, "rb").read() == b"adapters"
    shutil.rmtree(Path(path).parent)


def test_joining_a_cluster_that_refuses_names_ray_token_authentication_and_writes_nothing(bert, data, tmp_path,
                                                                                          monkeypatch):
    ray = pytest.importorskip("ray")
    from skimformer import UserError

    def refused(**_):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refused)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    out = tmp_path / "tuned"
    with pytest.raises(UserError) as e:
        tune_model(bert, BUDGET, out, data=data[1], space="skip", trials=1, ray="10.0.0.5:6379")
    message = str(e.value)
    assert "Failed to connect" in message and "RAY_AUTH_MODE=token" in message and len(message) < 220
    assert not out.exists()
