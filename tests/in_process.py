"""`python -m eetrain ...` run inside the test process: the same entry function (`eetrain.__main__.main`, or
`eetrain.evaluate.main`) with the same argv, through Hydra's real command-line path, but without starting an
interpreter and importing torch, Lightning and transformers again (~5 s a run on 2 cores).

`cli(...)` returns what `subprocess.run(..., capture_output=True, text=True)` would: the exit code
(`sys.exit(2)` of a one-line error is 2, Hydra's own errors of composition 2, an uncaught exception 1 with its traceback
on stderr), and stdout / stderr as the Python code wrote them (warnings included, under a new interpreter's
filters), read with universal newlines as `text=True` reads a pipe. What a run changes in the process
(working directory, argv, environment such as Lightning's PL_GLOBAL_SEED, the logging Hydra sets up, torch's
thread count) is put back afterwards.

Each entry point keeps a test in a real process: `python -m eetrain`'s exit code 2 and one-line message
(tests/test_checkpointing.py::test_cli_nan_learning_rate, through tests.test_config.cli), `python -m
eetrain.evaluate` (tests/test_evaluate.py::test_evaluate_a_saved_model); tests.tiny_runs starts the runs
that need a process of their own (SIGKILL, DDP, a SLURM sweep).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import subprocess
import sys
import traceback
import warnings
from pathlib import Path


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                    if isinstance(lg, logging.Logger)]


def _save_logging() -> tuple:
    """The loggers' settings, and the handlers that exist now taken out of `logging`'s own registry: Hydra
    configures logging with `dictConfig`, which first shuts down (closes) every handler in that registry,
    pytest's and the libraries' included (under pytest that closed the stream that is sys.stderr)."""
    state = [(lg, lg.level, list(lg.handlers), lg.propagate, lg.disabled) for lg in _loggers()]
    registry = (list(logging._handlerList), dict(logging._handlers))
    logging._handlerList[:] = []
    logging._handlers.clear()
    return state, registry


def _redirect_handlers(state: list[tuple], out: io.StringIO, err: io.StringIO) -> list[tuple]:
    """Handlers that write to this process's stdout / stderr (e.g. Lightning's own, made on import) write to
    the run's captured output instead, as they would in a child; returns what to put back."""
    moved, seen = [], set()
    for _, _, handlers, _, _ in state:
        for h in handlers:
            # (a `stream` property, as logging's _StderrHandler has, follows sys.stderr by itself)
            if isinstance(h, logging.StreamHandler) and id(h) not in seen and not isinstance(
                    getattr(type(h), "stream", None), property):
                seen.add(id(h))
                target = err if h.stream is sys.stderr else out if h.stream is sys.stdout else None
                if target is not None:
                    moved.append((h, h.setStream(target)))
    return moved


def _restore_logging(saved: tuple, streams: tuple) -> None:
    state, (handler_list, handlers_by_name) = saved
    kept = {id(h) for _, _, handlers, _, _ in state for h in handlers}
    for lg in _loggers():
        for h in list(lg.handlers):
            if id(h) not in kept:
                h.close()  # Hydra's file handler (<run dir>/<job>.log)
                if any(getattr(h, "stream", None) is s for s in streams):
                    lg.removeHandler(h)  # a logger made during the run, writing to this run's captured output
    for lg, level, handlers, propagate, disabled in state:
        lg.setLevel(level)
        lg.handlers[:] = handlers
        lg.propagate, lg.disabled = propagate, disabled
    logging._handlerList[:] = handler_list + logging._handlerList
    logging._handlers.update(handlers_by_name)


#: a new interpreter's warning filters (pytest records warnings instead of printing them)
_DEFAULT_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                    ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                    ("ignore", ResourceWarning, None)]


@contextlib.contextmanager
def _interpreter_warnings():
    """Warnings printed to stderr under the filters a new interpreter starts with, as a child's are."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = _print_warning  # not pytest's recorder
        yield


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli(*args: str, cwd: Path, module: str = "eetrain", timeout: float | None = None,
        threads: int | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> *args` in `cwd`, in this process (`timeout` is accepted and ignored). `threads`:
    torch's intra-op threads for the run, as OMP_NUM_THREADS sets them for a child (tests.tiny_runs.env)."""
    import torch

    entry = importlib.import_module("eetrain.__main__" if module == "eetrain" else module).main
    importlib.import_module("eetrain.train")  # libraries that set up logging on import do so outside the capture
    out, err = io.StringIO(), io.StringIO()
    num_threads = torch.get_num_threads()
    argv, environ, where, logs = list(sys.argv), dict(os.environ), os.getcwd(), _save_logging()
    code, moved = 0, []
    try:
        os.chdir(cwd)
        sys.argv = [module, *args]
        if threads is not None:
            torch.set_num_threads(threads)
        moved = _redirect_handlers(logs[0], out, err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _interpreter_warnings():
            try:
                entry()
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    code = e.code or 0
                else:  # sys.exit("message"): the interpreter prints it, exit code 1
                    print(e.code, file=sys.stderr)
                    code = 1
            except Exception:  # what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(where)
        sys.argv = argv
        torch.set_num_threads(num_threads)
        os.environ.clear()
        os.environ.update(environ)
        for handler, stream in moved:
            handler.setStream(stream)
        _restore_logging(logs, (out, err))
    return subprocess.CompletedProcess([sys.executable, "-m", module, *args], code, _text(out), _text(err))


def _text(stream: io.StringIO) -> str:
    """What `text=True` reads from a pipe: universal newlines, so a carriage return is a line break."""
    return stream.getvalue().replace("\r\n", "\n").replace("\r", "\n")
