"""Progress with an ETA for training, the stages, generation and sweeps.

On a terminal (or in Jupyter) a Rich bar: description, bar, done/total, elapsed, ETA. Elsewhere (CI,
`subprocess` with captured output, SLURM log files) a Rich bar would print nothing until it stops, and
tqdm's carriage-return updates become one endless line, so the same progress is written as plain lines:
one when it starts, one every `interval` seconds, one when it ends. Progress goes to stderr (results stay
on stdout), except Lightning's own Rich bar, which writes to stdout as Lightning does.

* `progress(items_or_total, desc)`: `for x in progress(grid, "quality-vs-speed sweep", unit="point")` or
  `with progress(n_batches, "records", unit="batch") as bar: ... bar.update(1)`.
* `training_progress_bar(...)`: the Lightning callback of `callbacks.progress_bar`.

`EETRAIN_PROGRESS=rich|lines|off` overrides the choice for both (`rich` forces the Rich bar, `off` is
silent; the training bar then follows `trainer.enable_progress_bar`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar

_CONSOLE: Any = None
MODES = ("auto", "rich", "lines", "off")


def console() -> Any:
    """The Rich console on stderr shared by every `progress` (nested bars stack on one live display)."""
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True)
    return _CONSOLE


def check_progress_env() -> None:
    """A ConfigError naming EETRAIN_PROGRESS when it holds no progress mode."""
    if os.environ.get("EETRAIN_PROGRESS", "").strip():
        _mode("off")


def _mode(mode: str = "auto", stream: str = "stderr") -> str:
    """`rich`, `lines` or `off`: EETRAIN_PROGRESS, else `mode`; `auto` is `rich` on a terminal."""
    env = os.environ.get("EETRAIN_PROGRESS", "").strip().lower()
    chosen = env or mode
    if chosen not in MODES:
        from eetrain.errors import ConfigError

        key = "the environment variable EETRAIN_PROGRESS" if env else "progress mode"
        raise ConfigError(f"{key}={chosen!r}; allowed: {', '.join(MODES)}")
    if chosen != "auto":
        return chosen
    if stream == "stderr":
        c = console()
    else:
        from rich.console import Console

        c = Console()
    return "rich" if c.is_jupyter or (c.is_terminal and not c.is_dumb_terminal) else "lines"


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def status_line(desc: str, n: int, total: float | None, elapsed: float, unit: str = "it", start: int = 0) -> str:
    """`desc: n/total [elapsed 0:00:12, ETA 0:00:28, 4.00 s/point]` (no total: no ETA). start: items done
    before `elapsed` began (a run resumed mid-epoch), left out of the rate."""
    head = f"{desc}: {n}/{total}" if total is not None and math.isfinite(total) else f"{desc}: {n}"
    parts = [f"elapsed {format_seconds(elapsed)}"]
    done = n - start
    if done > 0:
        if total is not None and math.isfinite(total):
            parts.append(f"ETA {format_seconds(elapsed / done * max(total - n, 0))}")
        per = elapsed / done
        parts.append(f"{per:.1f} s/{unit}" if per >= 1 else f"{1 / per if per else float('inf'):.1f} {unit}/s")
    elif total:
        parts.append("ETA ?")
    return f"{head} [{', '.join(parts)}]"


class progress:  # noqa: N801 - used like a function, as tqdm is
    """Progress over `items` (an iterable, or an int total) described by `desc`.

    Iterate it, or use it as a context manager and call `update(n)`. `unit` names one step in the
    rates; `interval`: seconds between lines when not on a terminal; `disable`: no output at all;
    `mode`: auto | rich | lines | off.
    """

    def __init__(
        self,
        items: Iterable[Any] | int | None = None,
        desc: str = "",
        *,
        total: int | None = None,
        unit: str = "it",
        disable: bool = False,
        interval: float = 10.0,
        mode: str = "auto",
    ):
        if isinstance(items, int) and not isinstance(items, bool):
            total, items = items, None
        elif total is None and items is not None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        self.items = items
        self.desc, self.total, self.unit, self.interval = desc, total, unit, interval
        self.mode = "off" if disable else _mode(mode)
        self.n = 0
        self._started = self._closed = False
        self._t0 = self._last = 0.0
        self._rich: Any = None
        self._task: Any = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> progress:
        if self._started:
            return self
        self._started = True
        self._t0 = self._last = time.monotonic()
        if self.mode == "rich":
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console(), transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total)
        elif self.mode == "lines":
            self._write(status_line(self.desc, 0, self.total, 0.0, self.unit))
        return self

    def update(self, n: int = 1) -> None:
        if not self._started:
            self.start()
        self.n += n
        if self.mode == "rich":
            self._rich.update(self._task, advance=n)
        elif self.mode == "lines":
            now = time.monotonic()
            if now - self._last >= self.interval and not self._finished():
                self._last = now
                self._write(status_line(self.desc, self.n, self.total, now - self._t0, self.unit))

    def close(self) -> None:
        if self._closed or not self._started:
            self._closed = True
            return
        self._closed = True
        if self.mode == "rich":
            self._rich.stop()
        elif self.mode == "lines":
            line = status_line(self.desc, self.n, self.total, time.monotonic() - self._t0, self.unit)
            self._write(line + (" done" if self._finished() else ""))

    def _finished(self) -> bool:
        return self.total is not None and self.n >= self.total

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def __enter__(self) -> progress:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        if self.items is None:
            raise TypeError("progress(total, ...) is not iterable; pass the items, or call update()")
        self.start()
        try:
            for item in self.items:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("progress without a total has no len()")
        return int(self.total)


# -- training ------------------------------------------------------------------------------------------


class NoProgressBar(L.Callback):
    """Stands in for the progress bar when `trainer.enable_progress_bar=false` (Lightning refuses a
    progress-bar callback then)."""


class LineProgressBar(ProgressBar):
    """Lightning progress as plain lines (stderr) for logs: every `interval_s` seconds during training and
    validation, and one line per epoch with the progress-bar metrics (train/loss, val/loss)."""

    def __init__(self, interval_s: float = 30.0):
        super().__init__()
        self.interval = float(interval_s)
        self._enabled = True
        self._t0 = self._last = self._v0 = self._vlast = 0.0
        self._n0 = 0  # batches of the epoch done before this process (a resume mid-epoch)

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _write(self, line: str) -> None:
        if self._enabled:
            print(line, file=sys.stderr, flush=True)

    def _epoch(self, trainer: L.Trainer) -> str:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        return f"Epoch {trainer.current_epoch + 1}" + (f"/{total}" if total else "")

    def _metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str:
        items = self.get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return "  ".join(f"{k}={float(v):.4g}" if isinstance(v, int | float) or hasattr(v, "item") else f"{k}={v}"
                         for k, v in items.items())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a run resumed mid-epoch starts there, without on_train_epoch_start
        self._t0 = self._last = time.monotonic()
        self._n0 = trainer.fit_loop.epoch_loop.batch_progress.current.completed

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = self._last = time.monotonic()
        self._n0 = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            line = status_line(f"{self._epoch(trainer)} training", batch_idx + 1, self.total_train_batches,
                               now - self._t0, "batch", self._n0)
            self._write(f"{line}  {self._metrics(trainer, pl_module)}".rstrip())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._v0 = self._vlast = time.monotonic()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        now = time.monotonic()
        if now - self._vlast >= self.interval:
            self._vlast = now
            self.has_dataloader_changed(dataloader_idx)
            what = self.sanity_check_description if trainer.sanity_checking else self.validation_description
            self._write(status_line(what, batch_idx + 1, self.total_val_batches_current_dataloader, now - self._v0,
                                    "batch"))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        n = trainer.fit_loop.epoch_loop.batch_progress.current.completed
        line = status_line(f"{self._epoch(trainer)} training", n, self.total_train_batches,
                           time.monotonic() - self._t0, "batch", self._n0)
        self._write(f"{line}  {self._metrics(trainer, pl_module)}".rstrip())


def training_progress_bar(enabled: bool = True, style: str = "auto", refresh_rate: int = 1,
                          interval_s: float = 30.0) -> L.Callback:
    """The Lightning progress bar of `callbacks.progress_bar`.

    enabled: `trainer.enable_progress_bar` (false: no bar; Lightning refuses a bar callback then).
    style: auto (Rich's `RichProgressBar` on a terminal, else `LineProgressBar`) | rich | lines | tqdm.
    refresh_rate: batches between Rich/tqdm refreshes; interval_s: seconds between plain lines.
    """
    allowed = ("auto", "rich", "lines", "tqdm")
    if style not in allowed:
        from eetrain.errors import ConfigError

        raise ConfigError(f"callbacks.progress_bar.style={style!r}; allowed: {', '.join(allowed)}")
    env = os.environ.get("EETRAIN_PROGRESS", "").strip().lower()
    if not enabled or env == "off":
        return NoProgressBar()
    if style == "tqdm":
        from lightning.pytorch.callbacks import TQDMProgressBar

        return TQDMProgressBar(refresh_rate=refresh_rate)
    if style == "auto":
        style = _mode("auto", stream="stdout")  # Lightning's Rich bar writes to stdout
    if style == "rich":
        from lightning.pytorch.callbacks import RichProgressBar

        return RichProgressBar(refresh_rate=refresh_rate)
    return LineProgressBar(interval_s=interval_s)
