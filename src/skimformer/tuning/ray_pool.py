"""Trials on Ray: one actor per worker, driven by the same Optuna loop as a local run.

Ray tasks driven by Optuna's ask-and-tell, not Ray Tune with its Optuna search: a worker must
keep state between calls (the unoptimized engine it times every candidate against, the rewritten
programs of the candidates it screened until they are measured), which is what an actor is; one
driver then writes `trials.jsonl`, screens, prunes and ranks the same way with one worker or
fifty, and resumes the same way; and Ray Tune's own experiment folders, checkpoints and resume
would compete with that file.

`--ray auto` starts a local cluster (or uses the one this process already joined) and the actors
read the model and exit heads from their paths; `--ray ADDRESS` joins a running cluster, whose
nodes may not share this machine's disk, so the files travel through Ray's object store and each
actor writes them to a folder of its own. The search rows always travel through the object store.
Each actor reserves `threads` CPUs and runs torch and the engines on that many threads.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skimformer.errors import UserError
from skimformer.tuning.rows import Rows
from skimformer.tuning.worker import Worker

INSTALL = "pip install 'skimformer[distributed]'"


# Ray 2.59 and later start clusters with token authentication, and a client that is not told
# so gets only "Failed to connect" (the token itself is read from ~/.ray/auth_token).
AUTH_HINT = "a cluster of `ray start` (Ray >= 2.59) wants RAY_AUTH_MODE=token set here too"


@dataclass
class ModelFiles:
    """A model (a .pt2 file or a decoder folder) and the exit heads, by path or as bytes."""

    path: str
    heads: str | None = None
    files: dict[str, bytes] | None = None  # name -> bytes: the model's files, when shipped
    heads_bytes: bytes | None = None

    @classmethod
    def shipped(cls, path: str, heads: str | None) -> "ModelFiles":
        source = Path(path)
        files = {p.name: p.read_bytes() for p in (sorted(source.iterdir()) if source.is_dir() else [source])
                 if p.is_file()}
        return cls(path, heads, files, Path(heads).read_bytes() if heads else None)

    def materialize(self) -> tuple[str, dict[str, str]]:
        """A local path of the model, and the rewrites of pipeline texts that point at the heads."""
        if self.files is None:
            return self.path, {}
        folder = Path(tempfile.mkdtemp(prefix="skimformer-tune-model-"))
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        aliases = {}
        if self.heads_bytes is not None:
            (folder / "exit-heads.safetensors").write_bytes(self.heads_bytes)
            aliases[self.heads] = str(folder / "exit-heads.safetensors")
        local = folder if Path(self.path).is_dir() else folder / Path(self.path).name
        return str(local), aliases


class RemoteWorker(Worker):
    """A Worker that first puts the model where it can read it (and removes its copy at the end)."""

    def __init__(self, files: ModelFiles, rows: Rows, backend: str, options: dict, threads: int):
        path, aliases = files.materialize()
        self.copy = None if files.files is None else Path(path) if Path(path).is_dir() else Path(path).parent
        super().__init__(path, rows, backend, options, threads, aliases)

    def close(self) -> None:
        super().close()
        if self.copy is not None:
            shutil.rmtree(self.copy, ignore_errors=True)


class Cluster:
    """The Ray cluster trials run on: joined (or started, for `auto`) when made, before `tune`
    writes anything, so a refused join leaves the output folder untouched; `close` shuts down
    only a cluster this process joined itself."""

    def __init__(self, address: str, verbose: bool = False):
        try:
            import ray
        except ImportError:
            raise UserError(f"--ray needs Ray, which is not installed: {INSTALL}") from None
        self.ray, self.address = ray, address
        self.started = not ray.is_initialized()
        if self.started:
            level = logging.INFO if verbose else logging.ERROR
            try:
                if address == "auto":
                    ray.init(address="local", include_dashboard=False, logging_level=level, log_to_driver=verbose)
                else:
                    ray.init(address=address, logging_level=level, log_to_driver=verbose)
            except (ConnectionError, ValueError, RuntimeError) as e:
                told = address == "auto" or "RAY_AUTH_MODE" in os.environ
                hint = "" if told else f"; {AUTH_HINT}"
                raise UserError(f"--ray {address}: cannot start or join a Ray cluster "
                                f"({str(e).splitlines()[0][:80]}){hint}") from None

    def workers(self, wanted: int | None, threads: int) -> int:
        """How many workers of `threads` CPUs to run: `wanted`, or as many as the cluster holds."""
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        size = wanted or max(1, cpus // threads)
        if size * threads > cpus:
            raise UserError(f"--workers {size} with {threads} thread(s) each needs {size * threads} CPUs; "
                            f"the Ray cluster has {cpus}")
        return size

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class RayPool:
    def __init__(self, cluster: Cluster, size: int, threads: int, files: ModelFiles, rows: Rows, backend: str,
                 options: dict):
        ray = self.ray = cluster.ray
        self.size = size
        if cluster.address != "auto" and files.files is None:
            files = ModelFiles.shipped(files.path, files.heads)
        actor = ray.remote(num_cpus=threads)(RemoteWorker)
        rows_ref, files_ref = ray.put(rows), ray.put(files)
        self.actors = [actor.remote(files_ref, rows_ref, backend, options, threads) for _ in range(self.size)]

    def submit(self, index: int, method: str, *args):
        return getattr(self.actors[index], method).remote(*args)

    def wait(self, handles: list):
        done, _ = self.ray.wait(handles, num_returns=1)
        try:
            return done[0], self.ray.get(done[0])
        except self.ray.exceptions.RayActorError as e:
            raise UserError(f"a Ray worker died or could not start ({str(e).splitlines()[0]}); the trials finished "
                            "so far are in trials.jsonl: run the same command again to resume") from None

    def close(self) -> None:
        for actor in self.actors:
            try:
                self.ray.get(actor.close.remote())
            except self.ray.exceptions.RayError:
                pass
            self.ray.kill(actor)
