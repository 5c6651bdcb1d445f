"""Early-exit decoding speed: Hugging Face `generate` vs eetrain's decoder, full, truncated and exiting.

Four implementations decode the same random sources with the same randomly initialised model:

* ``hf``      -- Hugging Face ``model.generate``, greedy, ``min_new_tokens = max_new_tokens`` so every
  row generates exactly ``--new-tokens`` tokens.
* ``full``    -- eetrain's KV-cached decoder that never exits (``policy=None``): the baseline of
  ``speedup`` (it should cost at most ``1.10 x hf``).
* ``static``  -- the same weights cut to their first K decoder blocks, decoded like ``full``: what an
  early exit at depth K can at best cost (the *ceiling*).
* ``eetrain`` -- early exits from a seeded schedule (``fixed:K``, ``random:MEAN``) with the ``copy``
  or ``parallel`` strategy and the ``ride_along`` or ``gather`` batch mode.

Rows per batch size (``--batches``, default 1,8,64): ``hf`` and ``full`` always; batch 1: ``fixed:4``
and ``random:4`` x ``copy`` / ``parallel``; batches 2..63: ``random:4`` with ``ride_along`` x
``copy`` / ``parallel`` and ``gather`` + ``copy``; batches >= 64: ``random:3`` / ``random:4`` /
``random:6`` x ``gather`` / ``ride_along`` with ``copy``. Schedules that reach deeper than the model are left
out (``random:MEAN`` draws exits up to 2 MEAN - 1, so it needs 2 MEAN - 1 <= L).
At every batch size also ``self_speculative`` (``draft:ExK``: drafts from layer E = L / 2, K per round,
every row at once): lossless, so it has no ``static`` ceiling; with random weights its acceptance (and
so its speed-up) says little about a trained model's.
``--temperature T`` samples every implementation instead (``hf`` with ``do_sample``); ``self_speculative``
then draws its drafts at layer E and keeps them by speculative sampling.
Each ``eetrain`` row gets its own ``static`` run at the depth its batch mode can reach (the mode ``generate``
reports, which ``rollback`` forces to ``gather``): the rounded mean exit layer (batch 1, ``gather``) or the
rounded mean of the per-step deepest exit (``ride_along``); ``ceiling_fraction = t_static / t_eetrain``
(1.0: the exits cost nothing beyond the layers run). The table shows one ``static`` row per depth (the
first row's static run at that depth).

``--crossover`` times ``random:4`` + ``copy`` with ``ride_along`` vs ``gather`` (and ``full``) at batch
sizes 1..64 and prints the smallest from which on ``gather`` is faster (where ``generate``'s
``batch_mode="auto"`` should switch: ``GATHER_MIN_BATCH``).

Usage::

    python benchmarks/decoding.py --shape cpu --device cpu --threads 1
    python benchmarks/decoding.py --shape cpu --device cpu --crossover --json
    python benchmarks/decoding.py --shape cpu --device cpu --batches 1,8 --temperature 1.0
    python benchmarks/decoding.py --shape llama-1b --device cuda --json

Timing: every run of a batch size (each static run too) is warmed up once, untimed, then timed
``--repeats`` times in rounds. A round runs every group once -- ``hf``, ``full``, and each ``eetrain`` row
followed at once by its own static run -- and starts one group later than round r - 1, so load drift
on a shared machine hits all alike and a row and its ceiling always run back to back.
``s_per_token`` is the median wall time; ``speedup`` (t_full / t) and ``ceiling_fraction``
(t_static / t_eetrain) are medians over rounds of the ratio of the two runs of that round
(``torch.cuda.synchronize`` around each run on CUDA); ``ceiling_rounds`` keeps every round's ratio. After
the table, one line per target the rows can answer, with its verdict on the median (``full`` vs ``hf``:
the ``hf`` row's ``speedup``, the median over rounds of t_full / t_hf; the ``CEILING_TARGETS`` rows, with
the spread of their rounds; ``gather``'s speed-up growing as the mean exit falls at batch >= 64).
``--crossover``, ``--policies`` and ``--free`` replace each other's rows: at most one of them. Importing
this module has no side effects (torch and eetrain are imported lazily).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMPLS = ("hf", "full", "static", "eetrain")
REQUIRED_KEYS = (
    "impl", "strategy", "batch_mode", "batch", "exits", "num_layers", "mean_exit_layer",
    "mean_batch_max_exit_layer", "s_per_token", "speedup", "ceiling_fraction", "decision_fraction",
    "device", "shape", "dtype", "new_tokens",
)
DEFAULT_BATCHES = (1, 8, 64)
CROSSOVER_BATCHES = (1, 2, 4, 8, 16, 32, 64)
LARGE_BATCH = 64  # from here on the rows compare mean exits and gather vs ride_along
DRAFT_TOKENS = 4  # self_speculative rows: k drafts per round, from the middle layer (LayerSkip's E = L / 2)
TARGET_FULL_VS_HF = 1.10  # eetrain's decoder without exits may cost at most this x HF generate
#: the lowest ceiling_fraction each row may reach: (batch, exits, strategy, batch mode, minimum)
CEILING_TARGETS = (
    *((1, e, s, "ride_along", 0.85) for e in ("fixed:4", "random:4") for s in ("copy", "parallel")),
    *((8, "random:4", s, "ride_along", 0.85) for s in ("copy", "parallel")),
    (64, "random:4", "copy", "gather", 0.70),
)


@dataclass(frozen=True)
class Shape:
    family: str  # "t5" (source -> encoder, exits on the decoder blocks) or "llama" (source = prompt)
    config: dict[str, Any]
    source: int  # source / prompt tokens per row
    new_tokens: int  # default --new-tokens
    dtype: str
    note: str = ""


SHAPES: dict[str, Shape] = {
    # For tests only: seconds on any machine. Vocabulary: the demo tokenizer's (441). Eight decoder
    # layers, so that random:4 (exits up to layer 7) and its gather / ride_along rows exist.
    "tiny": Shape(
        "t5",
        dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=8,
             feed_forward_proj="relu", dropout_rate=0.0),
        source=8, new_tokens=8, dtype="float32", note="smoke-test shape (T5, 2+8 layers, d=64, V=441)",
    ),
    # T5-base-like decoder behind a 2-layer encoder: the encoder costs every impl the same, the
    # decoder's 12 layers are what exits save. Unequal depths need the explicit cache in `hf_generate`.
    "cpu": Shape(
        "t5",
        dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=2, num_decoder_layers=12,
             vocab_size=8192, feed_forward_proj="relu", dropout_rate=0.0),
        source=32, new_tokens=32, dtype="float32", note="T5, 2-layer encoder, 12-layer decoder, d=768, V=8192",
    ),
    # t5-v1_1-large. Its config's tie_word_embeddings=False only turns off the decoder-output rescale
    # in transformers 5 (which ties the head to the embedding regardless): the same cost either way.
    "t5-large": Shape(
        "t5",
        dict(d_model=1024, d_ff=2816, d_kv=64, num_heads=16, num_layers=24, num_decoder_layers=24,
             vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
             dropout_rate=0.0),
        source=64, new_tokens=64, dtype="bfloat16", note="t5-v1_1-large shape (24+24 layers, d=1024, V=32128)",
    ),
    "llama-1b": Shape(
        "llama",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=128256, max_position_embeddings=2048,
             tie_word_embeddings=True, rope_theta=500000.0),
        source=64, new_tokens=64, dtype="bfloat16", note="Llama-3.2-1B shape (16 layers, d=2048, V=128256)",
    ),
}

_TOKENIZER = Path(__file__).resolve().parent.parent / "eetrain" / "data" / "demo" / "tokenizer"


@dataclass(frozen=True)
class Spec:
    """One implementation to time at one batch size."""

    impl: str
    exits: str = "full"  # eetrain: the schedule; static: "truncated:K"
    strategy: str | None = "copy"
    batch_mode: str | None = "ride_along"
    depth: int | None = None  # static: decoder blocks kept
    policy: Any = field(default=None, compare=False)  # eetrain with a real policy: its ExitPolicy
    candidates: int | None = None  # candidate-set confidence: k
    agreement: bool = False  # --free: collect FREE's (confidence, agrees) pairs while decoding
    rollback: float | None = None  # --free: FREE's RollBack limit in nats


#: where real policies exit: random weights make no policy meaningful, so each policy gets per-layer
#: thresholds that no score reaches before this layer and every score reaches at it; checks run
#: from layer 2, so every token pays for three checks (layers 2, 3, 4) before it leaves
POLICY_EXIT_LAYER = 4


def real_policies(backbone) -> list[Spec]:
    """One `eetrain` row per real exit policy, exiting at POLICY_EXIT_LAYER after checks at 2, 3, 4.

    The full-vocabulary softmax gap (for contrast), the same on 8 candidate tokens, hidden-state
    saturation, CALM's linear classifier, MEE's three-state MLP (width d, and d/4) and LSTM (250). The
    classifiers are untrained (seeded): their cost does not depend on their weights.
    """
    import torch

    from eetrain.exits.classifiers import CalmClassifier, LSTMClassifier, ThreeStateMLP
    from eetrain.exits.policy import ExitPolicy

    d, L = backbone.hidden_size, backbone.num_layers
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype

    def per_layer(low: float, high: float) -> list[float]:
        return [low if i == POLICY_EXIT_LAYER else high for i in range(1, L + 1)]

    prob = per_layer(0.0, 1.0)
    torch.manual_seed(0)
    rows = [
        ("softmax_gap", ExitPolicy("softmax_gap", prob, min_exit_layer=2), None),
        ("softmax_gap@k8", ExitPolicy("softmax_gap", prob, min_exit_layer=2), 8),
        ("hidden_saturation", ExitPolicy("hidden_saturation", per_layer(-1.0, 1.0), min_exit_layer=2), None),
    ]
    for name, clf in (
        ("classifier:calm", CalmClassifier(d)),
        ("classifier:three_state_mlp", ThreeStateMLP(d)),
        (f"classifier:three_state_mlp(w={d // 4})", ThreeStateMLP(d, width=d // 4)),
        ("classifier:lstm", LSTMClassifier(d, hidden_size=250)),
    ):
        clf = clf.to(device=device, dtype=dtype).eval()
        rows.append((name, ExitPolicy(clf, prob, min_exit_layer=2, name=name), None))
    return [Spec("eetrain", name, "copy", "ride_along", policy=policy, candidates=k) for name, policy, k in rows]


#: --free: the RollBack limit of the row that times its checks. On random weights the last layer is near
#: uniform (cross-entropy ~ log V ~ 9 nats at V = 8192), so a limit this high never fires: the row times
#: what checking costs, not what re-decoding costs (that depends on how often a trained model disagrees).
FREE_ROLLBACK = 100.0


def free_policies(backbone, batch: dict, new_tokens: int) -> list[Spec]:
    """`parallel` rows with a softmax-gap policy whose only exit is layer POLICY_EXIT_LAYER at the median
    score seen there (tokens at or above it leave there -- on random weights, whose scores tie, most do --,
    the others go the full depth, and their deep passes resolve FREE's pairs and run the RollBack checks):
    plain, collecting the adaptive threshold's pairs, and with RollBack checks (FREE_ROLLBACK)."""
    from eetrain.decoding import generate
    from eetrain.exits.policy import ExitPolicy

    L = backbone.num_layers
    never = ExitPolicy("softmax_gap", 1.0, min_exit_layer=2)  # a gap of exactly 1 does not happen
    pairs = generate(backbone, batch, never, strategy="parallel", max_new_tokens=new_tokens, stop_at_eos=False,
                     agreement=True).agreement
    at = min(POLICY_EXIT_LAYER, L - 1)
    median = float(pairs.confidence[pairs.layers == at].median())
    policy = ExitPolicy("softmax_gap", [median if i == at else 1.0 for i in range(1, L + 1)], min_exit_layer=2)
    name = f"softmax_gap@{at}"
    return [Spec("eetrain", name, "parallel", "ride_along", policy=policy),
            Spec("eetrain", f"{name}+pairs", "parallel", "ride_along", policy=policy, agreement=True),
            Spec("eetrain", f"{name}+rollback:{FREE_ROLLBACK:g}", "parallel", "ride_along", policy=policy,
                 rollback=FREE_ROLLBACK)]


def plan(batch: int, num_layers: int, crossover: bool = False) -> list[Spec]:
    """The `hf` / `full` / `eetrain` rows at one batch size (static rows follow from the exits)."""
    if crossover:
        specs = [Spec("full")] + [Spec("eetrain", "random:4", "copy", m) for m in ("ride_along", "gather")]
    else:
        specs = [Spec("hf", strategy=None, batch_mode=None), Spec("full")]
        if batch == 1:
            specs += [Spec("eetrain", e, s) for e in ("fixed:4", "random:4") for s in ("copy", "parallel")]
        elif batch < LARGE_BATCH:
            specs += [Spec("eetrain", "random:4", "copy"), Spec("eetrain", "random:4", "parallel"),
                      Spec("eetrain", "random:4", "copy", "gather")]
        else:
            specs += [Spec("eetrain", f"random:{m}", "copy", mode)
                      for m in (4, 3, 6) for mode in ("gather", "ride_along")]
        specs = [s for s in specs if s.impl != "eetrain" or _deepest_exit(s.exits) <= num_layers]
        # LayerSkip's draft-and-verify, every row at once: lossless, so no ceiling (its cost follows acceptance)
        specs.append(Spec("eetrain", f"draft:{num_layers // 2}x{DRAFT_TOKENS}", "self_speculative", "batched"))
    return specs


def _deepest_exit(exits: str) -> float:
    """The deepest layer a schedule exits at: K for `fixed:K`; 2 MEAN - 1 for `random:MEAN` (uniform on
    1..2 MEAN - 1), which must not be clipped at the depth, or the mean exit would not be MEAN."""
    kind, value = exits.split(":")
    return 2 * float(value) - 1 if kind == "random" else float(value)


# --------------------------------------------------------------------------------------------------
# Models, data, one decoding call
# --------------------------------------------------------------------------------------------------


def build(shape: Shape, device: str, seed: int = 0):
    """Backbone (random weights, eetrain adapter) on `device` in the shape's dtype, eval mode."""
    import torch

    from eetrain.backbones import LlamaBackbone, T5Backbone

    cls = {"llama": LlamaBackbone, "t5": T5Backbone}[shape.family]
    with torch.device(device):  # initialise on the device: far faster than on CPU for the 1B shapes
        backbone = cls(config=dict(shape.config), tokenizer=str(_TOKENIZER), seed=seed)
    backbone.to(dtype=getattr(torch, shape.dtype))
    return backbone.eval()


def truncate(backbone, depth: int):
    """The same model with only its first `depth` exit blocks (T5: decoder blocks), weights shared.

    A structural copy whose block list is sliced; parameters and buffers are the original tensors, so
    the truncated model is bit-identical to the first `depth` layers of `backbone` and costs no memory.
    """
    from torch import nn

    shared = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    static = copy.deepcopy(backbone, shared)
    path = next(name for name, module in static.named_modules() if module is static.blocks)
    parent, _, attr = path.rpartition(".")
    setattr(static.get_submodule(parent), attr, nn.ModuleList(list(static.blocks)[:depth]))
    static.num_layers = depth
    cfg = static.model.config
    setattr(cfg, "num_decoder_layers" if backbone.family == "t5" else "num_hidden_layers", depth)
    return static


def make_batch(backbone, batch: int, source: int, device: str, seed: int = 1234) -> dict:
    """Random source ids `(batch, source)` (no special tokens), all attended; the same for every impl."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, backbone.model.config.vocab_size, (batch, source), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def _cache_kwarg() -> str:
    """`generate`'s name for a caller's cache (transformers 5.x renamed `past_key_values` to `cache`)."""
    from transformers.generation import utils

    return "cache" if "cache" in getattr(utils, "ALL_CACHE_NAMES", ()) else "past_key_values"


def hf_generate(backbone, batch: dict, new_tokens: int, temperature: float = 0.0):
    """HF `generate` of exactly `new_tokens` tokens per row, greedy or (temperature > 0) sampled; returns
    their ids `(B, new_tokens)`.

    T5: transformers 5 sizes the decoder's self-attention cache by the *encoder* depth (`num_layers`)
    and `generate` fails with an IndexError when `num_decoder_layers` is larger (the `cpu` shape:
    2 + 12). Handing it a cache that grows per layer (what it builds otherwise, minus the preset
    depth) decodes the same model.
    """
    kwargs: dict[str, Any] = {}
    if backbone.family == "t5":
        from transformers import DynamicCache, EncoderDecoderCache

        kwargs[_cache_kwarg()] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    else:
        kwargs.update(do_sample=False)
    out = backbone.model.generate(**batch, num_beams=1, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    return out[:, -new_tokens:]


@dataclass
class _Run:
    """One implementation at one batch size: its model, its timings, its first (warm-up) output."""

    spec: Spec
    call: Callable[[], Any]  # one decoding call: HF's ids or eetrain's GenerateOutput
    seconds: list[float] = field(default_factory=list)
    decision_seconds: list[float] = field(default_factory=list)
    first: Any = None
    outputs: list[Any] = field(default_factory=list)
    count: Callable[[], Any] | None = None  # the same call with a FLOP counter (untimed; not for hf)

    def __call__(self, sync: Callable[[], None]) -> None:
        sync()
        t0 = time.perf_counter()
        out = self.call()
        sync()
        if self.first is not None:
            self.outputs.append(out)
        if self.first is None:
            self.first = out  # the warm-up: untimed
            return
        self.seconds.append(time.perf_counter() - t0)
        self.decision_seconds.append(getattr(out, "decision_seconds", 0.0))

    @property
    def tokens(self):
        """`(B, T)` ids of the warm-up call (every call decodes the same)."""
        return self.first.tokens if hasattr(self.first, "tokens") else self.first.cpu()

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def batch_mode(self) -> str | None:
        """The batch mode the run decoded with, as `generate` reports it: it can differ from the one asked
        for (`rollback` forces `gather`). HF's ids report none: the spec's (None)."""
        return getattr(self.first, "batch_mode", self.spec.batch_mode)


def _make_run(spec: Spec, backbone, batch: dict, new_tokens: int, temperature: float = 0.0) -> _Run:
    from eetrain.decoding import generate

    if spec.impl == "hf":
        return _Run(spec, lambda: hf_generate(backbone, batch, new_tokens, temperature))
    if spec.strategy == "self_speculative":
        layer, k = (int(v) for v in spec.exits.split(":")[1].split("x"))
        kw = dict(strategy="self_speculative", draft_layer=layer, draft_tokens=k, max_new_tokens=new_tokens,
                  stop_at_eos=False, temperature=temperature)
        return _Run(spec, lambda: generate(backbone, batch, **kw),
                    count=lambda: generate(backbone, batch, **kw, count_flops=True))
    policy = (spec.policy or spec.exits) if spec.impl == "eetrain" else None
    kw = dict(strategy=spec.strategy, batch_mode=spec.batch_mode, max_new_tokens=new_tokens, stop_at_eos=False,
              candidates=spec.candidates, temperature=temperature, agreement=spec.agreement, rollback=spec.rollback)
    return _Run(spec, lambda: generate(backbone, batch, policy, **kw),
                count=lambda: generate(backbone, batch, policy, **kw, count_flops=True))


def _round_robin(groups: list[list[_Run]], repeats: int, sync: Callable[[], None]) -> None:
    """`repeats` rounds, each calling every group's runs once, in order and back to back (a row, then its
    static run), starting one group later than the last round."""
    for i in range(repeats):
        k = i % len(groups)
        for group in groups[k:] + groups[:k]:
            for run in group:
                run(sync)


def paired_ratio(a: _Run, b: _Run) -> float:
    """Median over rounds of t_a / t_b, each ratio from the two calls of one round (a row and its static
    run: back to back), so they share the machine's state; on a shared VM whose speed drifts by +-20%
    within seconds, the per-round ratio is far steadier than a ratio of two medians."""
    return statistics.median(x / y for x, y in zip(a.seconds, b.seconds, strict=True))


def _median_of(run: _Run, attr: str) -> float:
    return statistics.median(getattr(o, attr) for o in run.outputs)


def ceiling_depth(out, batch: int, batch_mode: str) -> int:
    """The depth a static model needs to match what `out`'s batch mode computes per step."""
    mean = out.mean_batch_max_exit_layer if batch > 1 and batch_mode == "ride_along" else out.mean_exit_layer
    return min(max(1, math.floor(mean + 0.5)), out.num_layers)


# --------------------------------------------------------------------------------------------------
# One batch size
# --------------------------------------------------------------------------------------------------


def bench_batch(
    backbone, statics: dict[int, Any], batch_size: int, shape_name: str, new_tokens: int, repeats: int,
    device: str, crossover: bool = False, policies: bool = False, temperature: float = 0.0, free: bool = False,
    flops: bool = False,
) -> list[dict[str, Any]]:
    """Time every row of one batch size (statics: truncated models by depth, filled as needed); with
    `flops`, count each row's decoding FLOPs in one more, untimed call."""
    import torch

    shape = SHAPES[shape_name]
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    L = backbone.num_layers
    batch = make_batch(backbone, batch_size, shape.source, device)
    specs = plan(batch_size, L, crossover)
    if policies:
        specs = [Spec("full")] + real_policies(backbone)
    if free:
        specs = [Spec("full")] + free_policies(backbone, batch, new_tokens)
    runs = [_make_run(s, backbone, batch, new_tokens, temperature) for s in specs]
    for run in runs:  # warm-up; eetrain's exit layers fix the static depths
        run(sync)
    full = next(r for r in runs if r.spec.impl == "full")
    # Each eetrain row's own static run, timed right after the row in every round: its ceiling.
    ceiling: dict[int, _Run] = {}  # id(eetrain run) -> its static run
    if not crossover:
        for run in [r for r in runs if r.spec.impl == "eetrain" and r.spec.strategy != "self_speculative"]:
            depth = ceiling_depth(run.first, batch_size, run.batch_mode)
            if depth < L and depth not in statics:
                statics[depth] = truncate(backbone, depth)
            spec = Spec("static", f"truncated:{depth}", depth=depth)
            static = _make_run(spec, statics[depth] if depth < L else backbone, batch, new_tokens, temperature)
            static(sync)  # its own warm-up
            ceiling[id(run)] = static
    # One static record per depth below L (the full depth is `full`'s row): the first row's static run.
    shown: dict[int, _Run] = {}
    for static in ceiling.values():
        if static.spec.depth < L:
            shown.setdefault(static.spec.depth, static)

    load_before = os.getloadavg()[0]
    _round_robin([[run, *([ceiling[id(run)]] if id(run) in ceiling else [])] for run in runs], repeats, sync)
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    full_tokens = full.tokens
    recorded = [*runs, *shown.values()]
    # FLOPs are the same for every static run of one depth: counted once, on the one shown
    per_token = {id(r): r.count().flops_per_token for r in recorded if flops and r.count is not None}
    depth_flops = {L: per_token.get(id(full))} | {d: per_token.get(id(r)) for d, r in shown.items()}
    records = []
    for run in recorded:
        spec, out = run.spec, run.first
        t = run.median
        depth = spec.depth or L
        rec: dict[str, Any] = {
            "impl": spec.impl,
            "strategy": spec.strategy,
            "batch_mode": run.batch_mode,
            "batch": batch_size,
            "exits": spec.exits,
            "num_layers": depth,
            "mean_exit_layer": out.mean_exit_layer if spec.impl == "eetrain" else float(depth),
            "mean_batch_max_exit_layer": out.mean_batch_max_exit_layer if spec.impl == "eetrain" else float(depth),
            "s_per_token": t / (batch_size * new_tokens),
            "speedup": paired_ratio(full, run),
            "ceiling_fraction": None,
            "ceiling_depth": None,
            "decision_fraction": None if spec.impl == "hf" else statistics.median(run.decision_seconds) / t,
            # one exit check's cost in layer runs (batch 1: a layer runs one row) and checks per token
            "check_cost_layers": _median_of(run, "check_cost_in_layers") if spec.policy is not None else None,
            "checks_per_token": (out.checks / out.num_tokens) if spec.policy is not None else None,
            # fraction of generated ids equal to `full`'s (hf: ~1.0, the same greedy decoding)
            "agreement_with_full": float((run.tokens == full_tokens).double().mean()),
            "device": device,
            "shape": shape_name,
            "dtype": shape.dtype,
            "new_tokens": new_tokens,
            "temperature": temperature,
            "seconds": t,
            "times": [round(s, 4) for s in run.seconds],
            "load_avg": load,
        }
        if id(run) in ceiling:
            static = ceiling[id(run)]
            rec["ceiling_depth"] = static.spec.depth
            rec["ceiling_fraction"] = paired_ratio(static, run)
            # each round's ratio: how far the machine's noise spreads the median
            rec["ceiling_rounds"] = [round(x / y, 4) for x, y in zip(static.seconds, run.seconds, strict=True)]
        if id(run) in per_token:  # FLOPs: the arithmetic side of the same ratios
            rec["flops_per_token"] = per_token[id(run)]
            rec["flops_ratio"] = per_token[id(run)] / per_token[id(full)]
            if rec["ceiling_depth"] is not None:
                rec["ceiling_flops_fraction"] = depth_flops[rec["ceiling_depth"]] / per_token[id(run)]
        if free and spec.impl == "eetrain":  # time against the same policy decoding without FREE's extras
            rec["vs_plain"] = paired_ratio(run, runs[1])
            rec["pairs_per_token"] = None if out.agreement is None else out.agreement.confidence.numel() / out.num_tokens
            rec["rollbacks"] = out.rollbacks
        records.append(rec)
    return records


def run_benchmark(
    shape_name: str,
    device: str = "cpu",
    batches: tuple[int, ...] | None = None,
    new_tokens: int | None = None,
    repeats: int = 3,
    threads: int | None = None,
    crossover: bool = False,
    policies: bool = False,
    temperature: float = 0.0,
    free: bool = False,
    flops: bool = False,
) -> list[dict[str, Any]]:
    """Build the shape's model once and time every batch size's rows; one record per row (every
    implementation greedy, or sampled at `temperature` > 0; with `flops`, each row's decoding FLOPs)."""
    import torch
    import transformers

    if repeats < 1 or (new_tokens is not None and new_tokens < 1) or (threads is not None and threads < 1):
        raise ValueError(f"repeats ({repeats}), new_tokens ({new_tokens}) and threads ({threads}) must be >= 1")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature ({temperature}) must be finite and >= 0 (0: greedy)")
    if sum((crossover, policies, free)) > 1:
        raise ValueError("crossover, policies and free replace each other's rows: at most one of them")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda requested but torch.cuda.is_available() is False")
    if threads is not None:
        torch.set_num_threads(threads)
    shape = SHAPES[shape_name]
    new_tokens = new_tokens or shape.new_tokens
    batches = batches or (CROSSOVER_BATCHES if crossover else DEFAULT_BATCHES)
    machine = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
    }
    with torch.inference_mode():
        backbone = build(shape, device)
        statics: dict[int, Any] = {}
        records = []
        for b in batches:
            for rec in bench_batch(backbone, statics, b, shape_name, new_tokens, repeats, device, crossover,
                                   policies, temperature, free, flops):
                records.append({**rec, **machine})
    return records


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, sort_keys=False)


def crossover_batch(records: list[dict[str, Any]]) -> int | None:
    """The smallest batch size > 1 from which on `gather` decodes faster than `ride_along` (random:4,
    copy) at every measured batch size: `generate`'s `gather_min_batch`. Batch 1 is left out: there
    both modes run the same layers, and noise decides."""
    found = None
    for b in sorted({r["batch"] for r in records if r["batch"] > 1}, reverse=True):
        t = {r["batch_mode"]: r["seconds"] for r in records
             if r["batch"] == b and r["impl"] == "eetrain" and r["exits"] == "random:4" and r["strategy"] == "copy"}
        if "gather" not in t or "ride_along" not in t:
            continue
        if t["gather"] >= t["ride_along"]:
            break
        found = b
    return found


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table, one line per row (with FLOPs counted: FLOPs vs full and the FLOP ceiling too)."""
    flops = any("flops_ratio" in r for r in records)
    head = ("| batch | impl | strategy | batch mode | exits | mean exit | mean batch-max | ms/token | speedup "
            "| ceiling | decision | = full |" + (" FLOPs vs full | FLOP ceiling |" if flops else ""))
    lines = [head, "|" + "---|" * (14 if flops else 12)]
    for r in records:
        lines.append(
            f"| {r['batch']} | {r['impl']} | {r['strategy'] or '-'} | {r['batch_mode'] or '-'} | {r['exits']} "
            f"| {r['mean_exit_layer']:.2f} | {r['mean_batch_max_exit_layer']:.2f} | {1e3 * r['s_per_token']:.3f} "
            f"| {r['speedup']:.2f}x | {_fmt(r['ceiling_fraction'], '.2f')}"
            f"{'' if r['ceiling_depth'] is None else ' @' + str(r['ceiling_depth'])} "
            f"| {_fmt(r['decision_fraction'], '.3f')} | {r['agreement_with_full']:.2f} |"
            + (f" {_fmt(r.get('flops_ratio'), '.3f')} | {_fmt(r.get('ceiling_flops_fraction'), '.2f')} |"
               if flops else "")
        )
    return "\n".join(lines)


def target_lines(records: list[dict[str, Any]]) -> list[str]:
    """The targets the records can answer, one line each with its verdict (on the median): `full` vs `hf`
    per batch size (TARGET_FULL_VS_HF); each CEILING_TARGETS row's ceiling, with the spread of its rounds;
    at the largest batch, `gather`'s speed-up growing as the mean exit falls."""
    out = []
    for b in sorted({r["batch"] for r in records}):
        hf = next((r for r in records if r["batch"] == b and r["impl"] == "hf"), None)
        if hf is not None:
            ratio = hf["speedup"]  # the paired figure: median over rounds of t_full / t_hf
            verdict = "met" if ratio <= TARGET_FULL_VS_HF else "NOT met"
            out.append(f"target batch {b}: full <= {TARGET_FULL_VS_HF:.2f} x hf: {ratio:.2f}x -> {verdict}")
    for b, exits, strategy, mode, low in CEILING_TARGETS:
        row = next((r for r in records if r["impl"] == "eetrain" and (r["batch"], r["exits"], r["strategy"],
                    r["batch_mode"]) == (b, exits, strategy, mode) and r.get("ceiling_fraction") is not None), None)
        if row is None:
            continue
        rounds = row.get("ceiling_rounds") or [row["ceiling_fraction"]]
        spread = (f" (rounds {min(rounds):.2f}-{max(rounds):.2f}, >= {low:.2f} in {sum(x >= low for x in rounds)} "
                  f"of {len(rounds)})")
        verdict = "met" if row["ceiling_fraction"] >= low else "NOT met"
        out.append(f"target batch {b}, {exits}, {strategy}, {mode}: ceiling >= {low:.2f}: "
                   f"{row['ceiling_fraction']:.2f}{spread} -> {verdict}")
    big = max((r["batch"] for r in records), default=0)
    gather = sorted(((r["mean_exit_layer"], r["speedup"], r["exits"]) for r in records if r["batch"] == big
                     and r["impl"] == "eetrain" and r["batch_mode"] == "gather" and r["exits"].startswith("random:")),
                    reverse=True)
    if big >= LARGE_BATCH and len(gather) > 1:
        grows = all(a[1] < b[1] for a, b in zip(gather, gather[1:], strict=False))
        chain = " < ".join(f"{x:.2f}x ({e})" for _, x, e in gather)
        out.append(f"target batch {big}, gather: speed-up grows as the mean exit falls: {chain} -> "
                   f"{'met' if grows else 'NOT met'}")
    return out


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------


def _batches(text: str) -> tuple[int, ...]:
    try:
        return tuple(_positive_int(x) for x in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes >= 1, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be finite and >= 0 (0: greedy), got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", type=_batches, default=None,
                   help="comma-separated batch sizes (default 1,8,64; with --crossover 1,2,4,...,64)")
    p.add_argument("--new-tokens", type=_positive_int, default=None,
                   help="tokens generated per row (default: the shape's)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed runs per row after one warm-up (median)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch.set_num_threads (CPU)")
    # each replaces the default rows with its own: combined, all but one would be dropped without a word
    rows = p.add_mutually_exclusive_group()
    rows.add_argument("--crossover", action="store_true",
                      help="time random:4 ride_along vs gather per batch size; print where gather wins")
    rows.add_argument("--policies", action="store_true",
                      help="rows with real exit policies (thresholds tuned to a mean exit near 4): what deciding costs")
    rows.add_argument("--free", action="store_true",
                      help="batch 1, parallel: a policy as is, collecting FREE's adaptive-threshold pairs, and with "
                           "RollBack checks: what FREE's extras cost")
    p.add_argument("--temperature", type=_temperature, default=0.0,
                   help="sample every implementation at this temperature (0: greedy); self_speculative then "
                        "verifies its drafts by speculative sampling")
    p.add_argument("--flops", action="store_true",
                   help="also count each row's decoding FLOPs (one more, untimed call): flops_per_token, flops_ratio "
                        "(vs full) and ceiling_flops_fraction (the static model's FLOPs over the row's)")
    p.add_argument("--json", action="store_true", help="one JSON object per row, one per line")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    batches = args.batches or ((1,) if args.policies or args.free else None)
    records = run_benchmark(args.shape, args.device, batches, args.new_tokens, args.repeats,
                            args.threads, args.crossover, args.policies, args.temperature, args.free, args.flops)
    if args.json:
        for rec in records:
            print(json_line(rec), flush=True)
    else:
        r0, shape = records[0], SHAPES[args.shape]
        print(f"shape={args.shape} ({shape.note}) source={shape.source} new_tokens={r0['new_tokens']} "
              f"device={args.device}{' (' + r0['gpu'] + ')' if r0['gpu'] else ''} dtype={r0['dtype']} "
              f"threads={r0['threads']} repeats={args.repeats} (median, interleaved) "
              f"{'sampled at temperature ' + format(args.temperature, 'g') if args.temperature else 'greedy'} "
              f"torch={r0['torch']} "
              f"transformers={r0['transformers']}")
        print("speedup = t_full / t; ceiling = t_static / t_eetrain @ static depth; "
              "decision = share of the time in exit decisions; = full = share of tokens equal to full's")
        print(format_table(records))
        for line in target_lines(records):
            print(line)
        for r in records:
            if "vs_plain" in r:
                print(f"free: batch {r['batch']} {r['exits']}: {r['vs_plain']:.3f} x the plain decoder's time "
                      f"(pairs per token {_fmt(r['pairs_per_token'], '.2f')}, rollbacks {r['rollbacks']})")
    if args.crossover:  # on stderr with --json, so stdout stays one JSON object per line
        found = crossover_batch(records)
        where = f"from batch {found} on" if found else f"at none of batches {sorted({r['batch'] for r in records})}"
        print(f"crossover: gather faster than ride_along (random:4, copy) {where}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
