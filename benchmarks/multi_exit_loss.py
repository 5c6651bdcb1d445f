"""Training-step time and peak memory of a multi-exit (CALM) loss: plain vs naive vs eetrain.

Three implementations of one full training step (forward, backward, AdamW step) on the same model,
data and seed:

* ``plain``   -- standard fine-tuning: the wrapped Hugging Face model's own forward with ``labels``,
  i.e. the last layer only, logits materialised (and upcast to fp32) the way transformers does it.
* ``naive``   -- CALM loss on every exit, each exit's logits materialised and kept for backward
  (:class:`eetrain.losses.ExitCrossEntropy` with ``impl="naive"``).
* ``eetrain`` -- CALM loss on every exit through the fused, chunked multi-exit cross-entropy
  (``impl="auto"``: ``chunked`` on CPU, Liger / Cut-Cross-Entropy on CUDA when installed).

Usage::

    python benchmarks/multi_exit_loss.py --shape cpu --device cpu
    python benchmarks/multi_exit_loss.py --shape llama-1b --device cuda --json

By default every implementation's memory is measured in a fresh subprocess; on CPU one more
subprocess times all implementations with their steps interleaved (``--timing``), on CUDA each worker
times its own steps (``--in-process`` runs everything in this process, for tests). Memory
(``peak_mib``) is what the step allocates beyond the model and optimizer state; see
``benchmarks/README.md`` for how it is measured on CPU and CUDA. Importing this module has no side
effects (torch and eetrain are imported lazily).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMPLS = ("plain", "naive", "eetrain")
REQUIRED_KEYS = ("impl", "shape", "device", "s_per_step", "peak_mib")

# Targets of issue 3 (same run, same shape): eetrain peak <= x * plain, eetrain time <= y * naive. The CPU
# figures hold for any shape; the CUDA ones were set for one shape, so other shapes on CUDA get no verdict.
TARGETS = {"cpu": (1.15, 1.0), "cuda": (1.10, 0.85)}
CUDA_TARGET_SHAPE = "llama-1b"


@dataclass(frozen=True)
class Shape:
    family: str  # "llama" (tokens = seq) or "t5" (encoder: source tokens, decoder: seq tokens)
    config: dict[str, Any]
    batch: int
    seq: int
    source: int = 0
    note: str = ""


SHAPES: dict[str, Shape] = {
    # For tests only: seconds on any machine.
    "tiny": Shape(
        "llama",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=500, max_position_embeddings=64),
        batch=2, seq=16, note="smoke-test shape",
    ),
    # LLaMA-like, small enough for a 2-core CPU, large vocabulary so the logits matter vs the model.
    "cpu": Shape(
        "llama",
        dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=32000, max_position_embeddings=512),
        batch=4, seq=128, note="LLaMA-like, 4 layers, d=256, V=32000",
    ),
    "t5-base": Shape(
        "t5",
        dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
             vocab_size=32128, dropout_rate=0.0),
        batch=8, seq=512, source=512, note="T5-base shape (12+12 layers, d=768, V=32128)",
    ),
    "t5-large": Shape(
        "t5",
        dict(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
             vocab_size=32128, dropout_rate=0.0),
        batch=8, seq=512, source=512, note="T5-large shape (24+24 layers, d=1024, V=32128)",
    ),
    # Llama-3.2-1B: tied embeddings, GQA 32/8, 16 layers.
    "llama-1b": Shape(
        "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
             tie_word_embeddings=True, rope_theta=500000.0),
        batch=4, seq=1024, note="Llama-3.2-1B shape (16 layers, d=2048, V=128256)",
    ),
}

_TOKENIZER = Path(__file__).resolve().parent.parent / "eetrain" / "data" / "demo" / "tokenizer"


# --------------------------------------------------------------------------------------------------
# Model, data, step
# --------------------------------------------------------------------------------------------------


def build(shape: Shape, device: str, dtype, seed: int = 0):
    """Backbone (random weights, eetrain adapter) on `device` in `dtype`, train mode."""
    from eetrain.backbones import LlamaBackbone, T5Backbone

    cls = {"llama": LlamaBackbone, "t5": T5Backbone}[shape.family]
    backbone = cls(config=dict(shape.config), tokenizer=str(_TOKENIZER), seed=seed)
    backbone.to(device=device, dtype=dtype)
    backbone.train()
    return backbone


def make_batch(shape: Shape, device: str, seed: int = 1234) -> dict:
    """Random token ids, every target position scored; identical for every impl."""
    import torch

    g = torch.Generator().manual_seed(seed)
    vocab = shape.config["vocab_size"]
    if shape.family == "llama":
        ids = torch.randint(0, vocab, (shape.batch, shape.seq), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    else:
        src = torch.randint(0, vocab, (shape.batch, shape.source), generator=g)
        tgt = torch.randint(0, vocab, (shape.batch, shape.seq), generator=g)
        batch = {"input_ids": src, "attention_mask": torch.ones_like(src), "labels": tgt}
    return {k: v.to(device) for k, v in batch.items()}


def make_loss(impl: str, chunk_size: int | None = None):
    """The CALM loss term for `impl` (None for plain, which uses the model's own loss)."""
    from eetrain.losses import ExitCrossEntropy

    if impl == "plain":
        return None
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; expected one of {IMPLS}")
    return ExitCrossEntropy(
        weights="calm", layers=None, impl="naive" if impl == "naive" else "auto", chunk_size=chunk_size
    )


def train_step(impl: str, backbone, batch: dict, optimizer, loss_fn) -> tuple[float, float]:
    """One full step: forward, backward, optimizer step, grads freed. Returns (loss, last-layer CE)."""
    if impl == "plain":
        inputs = dict(backbone.model_inputs(batch))
        inputs["labels"] = batch["labels"]
        loss = backbone.model(**inputs, use_cache=False).loss
        last_ce = loss.detach()
    else:
        states = backbone(batch)
        out = loss_fn(states, backbone)
        loss = out.total
        last_ce = out.layer_ce[backbone.num_layers]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach()), float(last_ce)


def resolved_impl(impl: str, backbone, device: str) -> str:
    """What `multi_exit_cross_entropy` actually runs for `impl` (chunked / liger / cce / naive)."""
    if impl != "eetrain":
        return impl
    try:
        from eetrain.losses.fused_ce import _resolve_impl

        w = backbone.head_weight
        return _resolve_impl("auto", [w[:1]], w, 0.0)[0]
    except Exception:  # private helper renamed: report what was asked for
        return "auto"


# --------------------------------------------------------------------------------------------------
# Memory measurement
# --------------------------------------------------------------------------------------------------

_MiB = 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _cpu_settle(libc) -> None:
    """Drop Python garbage and hand freed malloc pages back to the OS, so RSS ~ live memory."""
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)


def _tune_malloc(libc) -> bool:
    """Make glibc serve every allocation >= 64 KiB by mmap and return it on free (no dynamic threshold).

    With glibc's defaults, freed tensors (up to 32 MiB) stay resident in malloc's heap and a later
    step reuses them without growing RSS, which hides part of the step's peak and, depending on the
    heap's history, makes the measured peak jump by whole buffers between runs. Call this before
    anything big is allocated.
    """
    if libc is None:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 0))


def _default_like_malloc(libc) -> None:
    """Thresholds glibc's dynamic defaults settle at once tensors have been freed (for the timing).

    The default mmap threshold grows to the largest freed mmapped chunk, capped at 32 MiB, and the
    trim threshold to twice that; fixed values reproduce that steady state.
    """
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * _MiB)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * _MiB)


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------------
# One implementation
# --------------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """One implementation's model, data, optimizer and loss, ready to step."""

    impl: str
    backbone: Any
    batch: dict
    optimizer: Any
    loss_fn: Any

    def step(self) -> tuple[float, float]:
        return train_step(self.impl, self.backbone, self.batch, self.optimizer, self.loss_fn)


def _torch_dtype(device: str, dtype: str):
    import torch

    cuda = device.startswith("cuda")
    return {"auto": torch.bfloat16 if cuda else torch.float32, "float32": torch.float32,
            "bfloat16": torch.bfloat16}[dtype]


def _setup(shape: Shape, impl: str, device: str, dtype: str, lr: float, chunk_size: int | None) -> _Run:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    torch.manual_seed(0)
    backbone = build(shape, device, _torch_dtype(device, dtype))
    batch = make_batch(shape, device)
    optimizer = torch.optim.AdamW(backbone.parameters(), lr=lr)
    return _Run(impl, backbone, batch, optimizer, make_loss(impl, chunk_size))


def _timed_steps(runs: list[_Run], steps: int, cuda: bool) -> dict[str, dict[str, Any]]:
    """`steps` rounds; each round steps every run once, starting one run later than the last round.

    Returns per impl: median wall and CPU seconds per step, all wall times, load average around.
    """
    import torch

    def sync():
        if cuda:
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {r.impl: [] for r in runs}
    cpu: dict[str, list[float]] = {r.impl: [] for r in runs}
    load_before = os.getloadavg()[0]
    for i in range(steps):
        k = i % len(runs)
        for run in runs[k:] + runs[:k]:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            run.step()
            sync()
            times[run.impl].append(time.perf_counter() - t0)
            cpu[run.impl].append(time.process_time() - c0)
    load_after = os.getloadavg()[0]
    return {
        impl: {
            "s_per_step": statistics.median(times[impl]),
            "times": [round(t, 4) for t in times[impl]],
            # CPU seconds of this process (all threads) per step. Careful: spinning OpenMP threads
            # count too, so on an oversubscribed machine this inflates as well.
            "cpu_s_per_step": round(statistics.median(cpu[impl]), 4),
            # 1-minute load average around the timed steps: above the core count means contention.
            "load_avg": [round(load_before, 2), round(load_after, 2)],
            "steps": steps,
        }
        for impl in times
    }


def run_impl(
    shape_name: str,
    impl: str,
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    chunk_size: int | None = None,
    dtype: str = "auto",
    lr: float = 1e-5,
    threads: int | None = None,
    isolated: bool = False,
    shape: Shape | None = None,
) -> dict[str, Any]:
    """Build, warm up, measure the memory of a step, time `steps` steps; return one result record.

    CPU: warm-up, one untimed step whose peak RSS is the memory, then the timed steps (`steps=0`:
    memory only). CUDA: warm-up, then the timed steps, whose peak allocation is the memory.
    `isolated=True` (a fresh process per impl, as the CLI runs it) also sets malloc up for the RSS
    measurement; without it the CPU memory figure is only indicative.
    """
    import torch

    if warmup < 1:
        raise ValueError("warmup must be >= 1: the first step allocates AdamW's state")
    cuda = device.startswith("cuda")
    if steps < (1 if cuda else 0):
        raise ValueError(f"steps must be >= {1 if cuda else 0} on {device}")
    shape = shape or SHAPES[shape_name]
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)

    libc = None if cuda else _libc()
    # CPU memory is read from RSS: malloc must give freed memory back from the very start.
    tuned = _tune_malloc(libc) if isolated else False

    run = _setup(shape, impl, device, dtype, lr, chunk_size)
    # Warm-up: the first step allocates AdamW's state; its loss is the same for every impl.
    first_loss, first_last_ce = run.step()
    for _ in range(warmup - 1):
        run.step()

    if cuda:
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        # One untimed step for the memory: peak RSS of the step minus RSS before it.
        _cpu_settle(libc)
        base = _proc_status_kib("VmRSS") * 1024
        reset = _reset_hwm()
        run.step()
        total_peak = _proc_status_kib("VmHWM") * 1024
        mem_method = ("VmHWM - VmRSS, peak reset via /proc/self/clear_refs" if reset
                      else "VmHWM (lifetime, clear_refs not writable) - VmRSS")
        mem_method += ", malloc mmap threshold 64 KiB" if tuned else ", default malloc"
        if tuned:
            _default_like_malloc(libc)

    timing = _timed_steps([run], steps, cuda)[impl] if steps else {
        "s_per_step": None, "times": [], "cpu_s_per_step": None, "load_avg": None, "steps": 0}

    if cuda:
        total_peak = torch.cuda.max_memory_allocated()
        mem_method = "cuda max_memory_allocated - memory_allocated, over the timed steps"

    backbone, batch = run.backbone, run.batch
    return {
        "impl": impl,
        "shape": shape_name,
        "device": device,
        "s_per_step": timing["s_per_step"],
        "peak_mib": round(max(total_peak - base, 0) / _MiB, 1),
        "base_mib": round(base / _MiB, 1),
        "total_peak_mib": round(total_peak / _MiB, 1),
        "loss": first_loss,
        "last_ce": first_last_ce,
        "resolved": resolved_impl(impl, backbone, device),
        "times": timing["times"],
        "cpu_s_per_step": timing["cpu_s_per_step"],
        "timing": "isolated",
        "steps": timing["steps"],
        "warmup": warmup,
        "dtype": str(_torch_dtype(device, dtype)).removeprefix("torch."),
        "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2),
        "exits": backbone.num_layers,
        "tokens": int((batch["labels"] != -100).sum()),
        "chunk_size": chunk_size,
        "threads": torch.get_num_threads(),
        "load_avg": timing["load_avg"],
        "mem_method": mem_method,
        "torch": torch.__version__,
    }


def time_interleaved(
    shape_name: str,
    impls: list[str],
    device: str = "cpu",
    steps: int = 3,
    warmup: int = 1,
    chunk_size: int | None = None,
    dtype: str = "auto",
    lr: float = 1e-5,
    threads: int | None = None,
    shape: Shape | None = None,
) -> dict[str, dict[str, Any]]:
    """Time all `impls` in one process, their steps interleaved, so load drift hits them alike."""
    import torch

    if warmup < 1 or steps < 1 or (threads is not None and threads < 1):
        raise ValueError(f"warmup ({warmup}), steps ({steps}) and threads ({threads}) must be >= 1")
    if len(set(impls)) != len(impls):  # one impl's times are kept under its name: a second run would mix in
        raise ValueError(f"impls must be distinct, got {impls}")
    shape = shape or SHAPES[shape_name]
    if threads is not None:
        torch.set_num_threads(threads)
    runs = [_setup(shape, impl, device, dtype, lr, chunk_size) for impl in impls]
    for run in runs:
        for _ in range(warmup):
            run.step()
    out = _timed_steps(runs, steps, device.startswith("cuda"))
    for rec in out.values():
        rec["timing"] = "interleaved"
    return out


def _worker_cmd(args: argparse.Namespace, impls: list[str], steps: int, flag: str) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), flag, "--impl", *impls,
           "--shape", args.shape, "--device", args.device, "--steps", str(steps),
           "--warmup", str(args.warmup), "--dtype", args.dtype, "--lr", str(args.lr)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    return cmd


def _run_worker(cmd: list[str], what: str) -> dict[str, Any]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark worker for {what} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def run_subprocess(args: argparse.Namespace, impl: str, steps: int | None = None) -> dict[str, Any]:
    """Run one impl in a fresh interpreter (clean allocator and peak counters); return its record."""
    steps = args.steps if steps is None else steps
    return _run_worker(_worker_cmd(args, [impl], steps, "--worker"), f"impl={impl!r}")


def time_subprocess(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved timing of all requested impls in one fresh interpreter."""
    return _run_worker(_worker_cmd(args, list(args.impl), args.steps, "--worker-timing"), "timing")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=False)


def _fmt(x: float | None, spec: str) -> str:
    """`x` formatted, or `-` where there is none (`--steps 0`: memory only, no time)."""
    return "-" if x is None else format(x, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table, ratios first: memory vs plain, time vs naive."""
    by = {r["impl"]: r for r in records}
    plain, naive = by.get("plain"), by.get("naive")

    def ref(r: dict | None, key: str):
        return r.get(key) if r else None

    head = ("| impl | peak vs plain | time vs naive | CPU time vs naive | peak MiB (step) | s/step "
            "| CPU s/step | total peak MiB | total vs plain | loss (step 1) | last-layer CE | runs as | load |")
    rows = [head, "|" + "---|" * 13]
    for r in records:
        cpu_s = r.get("cpu_s_per_step")
        load = r.get("load_avg")
        rows.append(
            f"| {r['impl']} | {_ratio(r['peak_mib'], ref(plain, 'peak_mib'))} "
            f"| {_ratio(r['s_per_step'], ref(naive, 's_per_step'))} "
            f"| {_ratio(cpu_s, ref(naive, 'cpu_s_per_step'))} "
            f"| {r['peak_mib']:.1f} | {_fmt(r['s_per_step'], '.3f')} | {_fmt(cpu_s, '.3f')} "
            f"| {r['total_peak_mib']:.1f} | {_ratio(r['total_peak_mib'], ref(plain, 'total_peak_mib'))} "
            f"| {r['loss']:.4f} | {r['last_ce']:.4f} | {r['resolved']} "
            f"| {'-' if not load else '/'.join(f'{x:.1f}' for x in load)} |"
        )
    return "\n".join(rows)


def target_lines(records: list[dict[str, Any]]) -> list[str]:
    """One line per target the records can answer, each with its verdict: eetrain's step peak vs plain's
    (needs both rows) and eetrain's time vs naive's (needs both, timed). On CUDA only for CUDA_TARGET_SHAPE."""
    by = {r["impl"]: r for r in records}
    ee, plain, naive = by.get("eetrain"), by.get("plain"), by.get("naive")
    if ee is None:
        return []
    dev = "cuda" if ee["device"].startswith("cuda") else "cpu"
    if dev == "cuda" and ee["shape"] != CUDA_TARGET_SHAPE:
        return []
    where = dev if dev == "cpu" else f"{dev}, {ee['shape']}"
    mem_t, time_t = TARGETS[dev]
    ok = lambda v, t: "met" if v <= t else "NOT met"  # noqa: E731
    out = []
    if plain is not None:
        mem = ee["peak_mib"] / plain["peak_mib"] if plain["peak_mib"] else float("nan")
        tot = ee["total_peak_mib"] / plain["total_peak_mib"]
        out.append(f"target ({where}) eetrain step peak <= {mem_t:.2f} x plain: {mem:.2f}x -> {ok(mem, mem_t)} "
                   f"(total peak incl. model+optimizer: {tot:.2f}x -> {ok(tot, mem_t)})")
    if naive is not None and ee["s_per_step"] is not None and naive["s_per_step"]:
        tim = ee["s_per_step"] / naive["s_per_step"]
        out.append(f"target ({where}) eetrain time <= {time_t:.2f} x naive: {tim:.2f}x -> {ok(tim, time_t)}")
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=IMPLS,
                   help="implementations to run (default: all three)")
    p.add_argument("--steps", type=_int_at_least(0), default=3,
                   help="timed steps after warm-up (median reported); 0: memory only (CPU)")
    p.add_argument("--warmup", type=_int_at_least(1), default=1, help="untimed steps first (>= 1: AdamW state)")
    p.add_argument("--chunk-size", type=_int_at_least(1), default=None,
                   help="rows per chunk for the chunked loss (default: fused_ce's own sizing)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="model dtype (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--threads", type=_int_at_least(1), default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object per impl, one per line")
    p.add_argument("--in-process", action="store_true",
                   help="run every impl in this process (default: a fresh subprocess each)")
    p.add_argument("--timing", choices=["interleaved", "isolated"], default=None,
                   help="interleaved: time all impls in one extra process, steps in turn, so load "
                        "drift on a shared machine hits them alike (default on CPU); isolated: time "
                        "each in its own memory worker (default on CUDA)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-timing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    dupes = sorted({impl for impl in args.impl if args.impl.count(impl) > 1})
    if dupes:  # both runs' times would land in one record
        p.error(f"--impl: {', '.join(dupes)} given more than once")
    if args.steps == 0 and args.device != "cpu":
        p.error("--steps 0 (memory only) needs --device cpu: on CUDA the memory is measured over the timed steps")
    if args.timing is None:
        args.timing = "interleaved" if args.device == "cpu" else "isolated"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        (impl,) = args.impl
        rec = run_impl(args.shape, impl, args.device, args.steps, args.warmup, args.chunk_size,
                       args.dtype, args.lr, args.threads, isolated=True)
        print(json_line(rec), flush=True)
        return 0
    if args.worker_timing:
        out = time_interleaved(args.shape, list(args.impl), args.device, args.steps, args.warmup,
                               args.chunk_size, args.dtype, args.lr, args.threads)
        print(json.dumps(out), flush=True)
        return 0

    # --steps 0: memory only, from the per-impl workers (or in this process); nothing to time together
    interleave = args.timing == "interleaved" and not args.in_process and args.steps > 0
    records = []
    for impl in args.impl:
        if args.in_process:
            rec = run_impl(args.shape, impl, args.device, args.steps, args.warmup, args.chunk_size,
                           args.dtype, args.lr, args.threads)
        else:  # a fresh process per impl; memory only when the timing comes from the shared run
            rec = run_subprocess(args, impl, steps=0 if interleave and args.device == "cpu" else None)
        records.append(rec)
        if args.json and not interleave:
            print(json_line(rec), flush=True)
    if interleave:
        timing = time_subprocess(args)
        for rec in records:
            rec.update(timing[rec["impl"]])
        if args.json:
            for rec in records:
                print(json_line(rec), flush=True)
    if not args.json:
        r0 = records[0]
        print(f"shape={args.shape} ({SHAPES[args.shape].note}) device={args.device} dtype={r0['dtype']} "
              f"params={r0['params_m']}M exits={r0['exits']} tokens={r0['tokens']} steps={args.steps} "
              f"(median) warmup={args.warmup} threads={r0['threads']} timing={r0['timing']} "
              f"torch={r0['torch']}")
        print(f"peak = allocated during a step beyond model+optimizer state [{r0['mem_method']}]")
        print(format_table(records))
        for line in target_lines(records):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
