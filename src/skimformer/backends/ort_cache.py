"""The decoding state of an ONNX Runtime engine whose cache GroupQueryAttention updates in place.

After the prefill, each layer's cache is copied once into a buffer preallocated for the longest
sequence the generation feeds (the prompt and every generated token but the last); every decode step binds that buffer (ONNX Runtime I/O
binding) as both the `past_*` input and the `present_*` output, so the kernel appends the
step's keys and values where they belong and nothing of the cache is copied or goes through
numpy. Only the step's small inputs and the outputs the loop reads (logits, a returned mask,
`exit_layer`) cross into numpy.
"""
from __future__ import annotations

import numpy as np

from skimformer.backends.speculation import SEQUENCE_AXIS
from skimformer.ir.signature import carried_input


class InPlaceCache:
    """`generate`'s cache for a prefill runner and a decode runner with `in_place_cache`."""

    def __init__(self, prefill, decode, max_new_tokens: int):
        self.prefill_runner, self.decode_runner = prefill, decode
        self.max_new_tokens = max_new_tokens
        self.buffers: dict[str, object] = {}  # past input name -> OrtValue
        self.binding = None
        self.held = 0

    def step(self, feeds: dict, role: str) -> dict:
        if role == "prefill":
            outputs = self.prefill_runner.run(feeds)
            self._allocate(outputs)
            return outputs
        return self._decode(feeds)

    def _allocate(self, outputs: dict[str, np.ndarray]) -> None:
        import onnxruntime as ort

        self.buffers, self.held = {}, 0
        for name, value in outputs.items():
            past = carried_input(name)
            if past is None:
                continue
            shape = list(value.shape)
            shape[SEQUENCE_AXIS] += self.max_new_tokens - 1
            buffer = np.zeros(shape, dtype=value.dtype)
            buffer[:, :, : value.shape[SEQUENCE_AXIS]] = value
            self.buffers[past] = ort.OrtValue.ortvalue_from_numpy(buffer)
            self.held += buffer.nbytes
        self.binding = self._bind_cache()

    def _bind_cache(self):
        """One binding for the whole generation: the cache buffers as inputs and outputs, bound
        once (sixty calls a step for a 30-layer model, otherwise); a step rebinds its small inputs."""
        runner = self.decode_runner
        binding = runner.session.io_binding()
        for name in runner.input_names:
            if name in self.buffers:
                binding.bind_ortvalue_input(name, self.buffers[name])
        for output, name in zip(runner.session.get_outputs(), runner.output_names):
            if carried_input(name) in self.buffers:
                binding.bind_ortvalue_output(output.name, self.buffers[carried_input(name)])
            else:
                binding.bind_output(output.name, "cpu")
        return binding

    def _decode(self, feeds: dict) -> dict:
        runner = self.decode_runner
        for name in runner.input_names:
            if name not in self.buffers:
                self.binding.bind_cpu_input(name, np.ascontiguousarray(feeds[name]))
        runner.session.run_with_iobinding(self.binding)
        return {name: value.numpy() for name, value in zip(runner.output_names, self.binding.get_outputs())
                if carried_input(name) not in self.buffers}

    @property
    def bytes(self) -> int:
        """The cache buffers held: their full preallocated size."""
        return self.held
