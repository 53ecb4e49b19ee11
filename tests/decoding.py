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


def hidden_after(hf, prefill: dict, decode: dict, blocks: int) -> torch.Tensor:
    """The transformers model's residual stream after its first `blocks` layers at the decode
    step's positions, computed over the whole sequence (prefill example, then decode example)."""
    n = decode["input_ids"].shape[1]
    with torch.no_grad():
        out = hf(input_ids=torch.cat([prefill["input_ids"], decode["input_ids"]], 1),
                 attention_mask=decode["attention_mask"],
                 position_ids=torch.cat([prefill["position_ids"], decode["position_ids"]], 1),
                 output_hidden_states=True)
    return out.hidden_states[blocks][:, -n:]
