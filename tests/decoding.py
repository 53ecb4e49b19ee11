"""Run a decoder's programs in torch behind the engine's `run(feeds, role)` interface, so the
decoding loops can be checked against the programs themselves without building an engine."""
from __future__ import annotations

import numpy as np
import torch

from skimformer.ir import Model


def torch_runner(model: Model):
    def run(feeds: dict, role: str) -> dict[str, np.ndarray]:
        program = model.programs[role]
        inputs = {name: torch.as_tensor(np.asarray(feeds[name])) for name in program.input_names}
        return {k: v.numpy() for k, v in program.run(inputs).items()}

    return run
