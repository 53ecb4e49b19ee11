"""Progress and warnings on stderr, so stdout stays for results (`--json` prints one object)."""
from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self):
        self.start = time.perf_counter()

    def __call__(self, message: str) -> None:
        print(f"[skimformer {time.perf_counter() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)

    @staticmethod
    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)
