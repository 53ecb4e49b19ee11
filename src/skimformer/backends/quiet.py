"""Silence the toolchains a backend drives: the exporters and compilers log, warn and print
progress of their own, while skimformer's progress goes to stderr."""
from __future__ import annotations

import contextlib
import io
import logging
import warnings


@contextlib.contextmanager
def quiet(logger_names: tuple[str, ...]):
    """Loggers `logger_names` at ERROR, warnings ignored and stdout swallowed, for the block."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
