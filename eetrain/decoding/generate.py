"""KV-cached generation with token-level early exits, for every token-head `ExitBackbone`.

One decoding step runs the layers of the new token in order; after each layer that can carry an exit
the decider (an `ExitPolicy`, evaluated on what has been computed so far) says whether the token
leaves there. The token is produced by the shared exit head at its exit layer.

Layers a token skips still need keys/values, since later tokens attend to them (`strategy`):

* ``copy`` (CALM): a skipped layer's keys/values are its own projections of the exit state.
* ``parallel`` (FREE's synchronized parallel decoding, EE-LLM's recomputation): the skipped layers
  are really computed, later, in the same forward as the next token that goes deeper (one pass
  over the waiting positions and the new token), so deep keys/values equal the full model's.
* ``self_speculative`` (LayerSkip): draft ``draft_tokens`` tokens with layers 1..``draft_layer`` and
  the shared head, verify them with the remaining layers in one forward, keep the accepted prefix
  and the correction. Greedy, the output equals full-model greedy decoding; sampling (temperature > 0,
  top_p), drafts are drawn from the draft's distribution and verified by speculative sampling, so the
  output is distributed as the full model's samples.

Both ``copy`` and ``parallel`` are *lazy*: a skipped position waits until a later token of its row
needs that layer, then every waiting position of the row is handled in one batched call. So layers
that no later token reaches cost nothing (a fixed exit at layer K costs what the model truncated to
K layers costs), and the work that is needed is batched over positions.

Batches with per-sample exits (`batch_mode`):

* ``ride_along``: a layer runs for every row while any row still needs it; rows whose token has
  exited ride along (their states of those layers are real), the step ends at the batch's deepest
  exit. Small batches are memory-bound: a layer costs about the same for 1 row as for 8. With
  ``parallel`` a row's output is the one it gets alone; with ``copy`` it depends on its batch-mates
  (real states up to the batch's deepest exit, copied above it).
* ``gather``: each layer computes only the rows still deciding (gathered, scattered back); time
  follows the batch's *mean* exit layer. Pays once the step is compute-bound (large batches). Every
  row's output is the one it gets alone, with either strategy.
* ``auto``: ``gather`` from ``gather_min_batch`` rows on (the measured crossover), else ``ride_along``.

``copy`` and ``parallel`` support both modes; ``self_speculative`` runs every row at once, each row
accepting its own drafts and moving on at its own cache slots (LayerSkip decodes one row at a time).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from eetrain.backbones.kv import Copied
from eetrain.errors import ConfigError
from eetrain.exits.beta_mixture import is_confidence
from eetrain.exits.measures import ExitRecords
from eetrain.exits.policy import ExitPolicy

from .decisions import LayerDecider, ScheduledExits, describe, with_check_every
from .flops import FlopCount

STRATEGIES = ("copy", "parallel", "self_speculative")
BATCH_MODES = ("auto", "ride_along", "gather")
#: batch size from which `auto` gathers the running rows. CPU: measured (BENCHMARKS.md, "Early-exit
#: decoding": gather ahead at batch 8 in every run, within +-5% of ride_along from 16 on, behind or level
#: below 8). CUDA: not measured yet (no GPU session); decoding stays memory-bound to larger batches
#: there, so ride_along below 64.
GATHER_MIN_BATCH = {"cpu": 8, "cuda": 64}


@dataclass
class AgreementPairs:
    """One pair per exit check whose token's last-layer prediction the decoder computed (FREE's
    adaptive threshold estimator, `eetrain.exits.beta_mixture`): `confidence (n,)` the policy's score,
    `agree (n,)` bool, the check's prediction equals the last layer's; where: `rows`, `positions`
    (1-based decoding position) and `layers` of the checks, all `(n,)`."""

    confidence: Tensor
    agree: Tensor
    rows: Tensor
    positions: Tensor
    layers: Tensor


@dataclass
class GenerateOutput:
    """What :func:`generate` returns.

    tokens: `(B, T)` generated ids (padding after a row's end of sequence). exit_layers: `(B, T)`
    long, the layer each token left at (0 after a row's end). lengths: `(B,)` generated tokens per row
    (the end-of-sequence token included). batch_max_exit_layers: per step, the deepest exit in the batch.

    Time (host wall clock; on CUDA the parts are only indicative, the total is synchronised):
    seconds = prefill_seconds (encoder / prompt) + layer_seconds (decoder layers, skipped layers'
    keys/values included) + decision_seconds (exit decisions, the exit head when a measure needs it)
    + head_seconds (the head for tokens that exited without logits) + other_seconds (bookkeeping).
    layer_calls: layer runs (one per layer per step); checks: (row, layer) exit checks scored.

    FLOPs (with `count_flops=True`, `eetrain.decoding.flops`; None otherwise): flops, all that ran in the
    call; prefill_flops, the encoder's / prompt's part; decode_flops = flops - prefill_flops.
    """

    tokens: Tensor
    exit_layers: Tensor
    lengths: Tensor
    num_layers: int
    seconds: float
    decision_seconds: float
    policy: str
    strategy: str
    batch_mode: str
    batch_max_exit_layers: list[int] = field(default_factory=list)
    prefill_seconds: float = 0.0
    layer_seconds: float = 0.0
    head_seconds: float = 0.0
    layer_calls: int = 0
    checks: int = 0
    records: ExitRecords | None = None  # with record=True: every token's state after every layer
    agreement: AgreementPairs | None = None  # with agreement=True: FREE's (confidence, agrees) pairs
    rollbacks: int = 0  # with rollback: how often a check replaced a token, and the tokens decoded after
    discarded_tokens: int = 0  # a replaced one (the one in flight included) that were thrown away
    flops: int | None = None
    prefill_flops: int | None = None

    @property
    def decode_flops(self) -> int | None:
        return None if self.flops is None or self.prefill_flops is None else self.flops - self.prefill_flops

    @property
    def flops_per_token(self) -> float:
        """Decoding FLOPs per generated token (the prefill's left out: early exit does not change it)."""
        if self.decode_flops is None or not self.num_tokens:
            return float("nan")
        return self.decode_flops / self.num_tokens

    @property
    def other_seconds(self) -> float:
        return self.seconds - self.prefill_seconds - self.layer_seconds - self.decision_seconds - self.head_seconds

    @property
    def seconds_per_layer(self) -> float:
        """Mean time of one layer run (per step, all rows that ran it)."""
        return self.layer_seconds / self.layer_calls if self.layer_calls else float("nan")

    @property
    def check_cost_in_layers(self) -> float:
        """Mean cost of one exit check, in layer runs (meaningful at batch 1, where a layer runs one row)."""
        if not self.checks or not self.layer_calls:
            return float("nan")
        return (self.decision_seconds / self.checks) / self.seconds_per_layer

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def mean_exit_layer(self) -> float:
        valid = self.exit_layers > 0
        return float(self.exit_layers[valid].double().mean()) if bool(valid.any()) else float("nan")

    @property
    def mean_batch_max_exit_layer(self) -> float:
        steps = self.batch_max_exit_layers
        return float(np.mean(steps)) if steps else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else float("nan")

    @property
    def decision_fraction(self) -> float:
        return self.decision_seconds / self.seconds if self.seconds > 0 else float("nan")

    def sequences(self) -> list[list[int]]:
        """Each row's generated ids, up to and including its end-of-sequence token."""
        return [self.tokens[r, : int(n)].tolist() for r, n in enumerate(self.lengths)]

    def row_exit_layers(self) -> list[list[int]]:
        return [self.exit_layers[r, : int(n)].tolist() for r, n in enumerate(self.lengths)]


def require_token_head(backbone: Any, what: str = "decoding") -> None:
    """Decoding writes text: a sequence classifier (BERT) has nothing to generate."""
    if getattr(backbone, "head_kind", "token") != "token":
        raise ConfigError(f"{what} needs a token head (T5, LLaMA); the {backbone.family} adapter predicts one label "
                          "per sequence (its early exits: stages=[classify])")


def _check(
    backbone: Any, batch: Mapping[str, Tensor], strategy: str, batch_mode: str, max_new_tokens: int,
    temperature: float, top_p: float,
) -> None:
    require_token_head(backbone)
    if strategy not in STRATEGIES:
        raise ConfigError(f"decoding.strategy={strategy!r}; allowed: {', '.join(STRATEGIES)}")
    if batch_mode not in BATCH_MODES:
        raise ConfigError(f"decoding.batch_mode={batch_mode!r}; allowed: {', '.join(BATCH_MODES)}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ConfigError(f"decoding.max_new_tokens={max_new_tokens!r}; allowed: an integer >= 1")
    if "attention_mask" not in batch or "input_ids" not in batch:
        raise ConfigError(
            f"decoding needs a batch with input_ids and attention_mask (got keys {sorted(batch)}); "
            "build it with the backbone's collate or the tokenizer's padding"
        )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if ids.ndim != 2 or tuple(mask.shape) != tuple(ids.shape) or ids.shape[0] == 0:
        # a narrower mask would read as left padding (LLaMA) and decode another prompt without an error
        raise ConfigError(f"decoding needs input_ids and attention_mask of one shape (batch >= 1, length); got "
                          f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not 0 <= temperature < math.inf:
        raise ConfigError(f"decoding.temperature={temperature!r}; allowed: a number >= 0 (0 = greedy)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"decoding.top_p={top_p!r}; allowed: 0 < top_p <= 1")


def _as_decider(
    policy: Any, backbone: Any, seed: int, candidates: int | None = None, check_every: int | None = None
) -> LayerDecider | ScheduledExits:
    if isinstance(policy, str):
        return ScheduledExits(policy, backbone.num_layers, seed=seed)
    if isinstance(policy, ScheduledExits):
        if policy.num_layers != backbone.num_layers:
            raise ConfigError(f"exits={policy.spec!r} was scheduled for {policy.num_layers} layers; the model has "
                              f"{backbone.num_layers}")
        return policy
    if policy is not None and not isinstance(policy, ExitPolicy):
        raise ConfigError(
            f"decoding.policy: expected an ExitPolicy, 'fixed:K', 'random:MEAN' or None, got {type(policy).__name__}"
        )
    if policy is not None:
        policy = with_check_every(policy, check_every, backbone.num_layers)
    return LayerDecider(policy, backbone, backbone.num_layers, candidates=candidates)


def sampling_probs(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """The distribution sampling draws from: `softmax(logits / temperature)` cut to the smallest set of
    most likely tokens whose mass reaches `top_p` (nucleus), renormalised. `(..., V)` -> `(..., V)` float."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # the most likely token is always kept
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p * keep)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class _Sampler:
    """Greedy (temperature 0) or temperature / nucleus sampling with its own seeded generator."""

    def __init__(self, temperature: float, top_p: float, seed: int, device: torch.device) -> None:
        self.temperature, self.top_p = temperature, top_p
        self.generator = None
        if temperature > 0:
            self.generator = torch.Generator(device=device).manual_seed(seed)

    def probs(self, logits: Tensor) -> Tensor:
        """`(..., V)` logits -> the `(..., V)` distribution `__call__` draws from (sampling only)."""
        return sampling_probs(logits, self.temperature, self.top_p)

    def __call__(self, logits: Tensor) -> Tensor:
        """`(n, V)` -> `(n,)` token ids."""
        if self.generator is None:
            return logits.argmax(dim=-1)
        return torch.multinomial(self.probs(logits), 1, generator=self.generator)[:, 0]


def speculative_accept(
    p: Tensor, q: Tensor, drafts: Tensor, uniform: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Speculative sampling's verification (Leviathan et al. 2023, Chen et al. 2023), row by row.

    p, q: `(n, k, V)` the full model's and the draft's distributions at the k drafted positions;
    drafts: `(n, k)` the drafted tokens (each drawn from its q); uniform: `(n, k)` draws from U[0, 1).
    Draft j is kept when every earlier one was and `uniform_j < p_j(d_j) / q_j(d_j)`; at the first
    rejected position the replacement is drawn from `max(0, p_j - q_j)`, renormalised. The kept drafts
    and the replacement are then distributed exactly as tokens drawn from p one by one.
    Returns `accepted (n,)` long in 0..k and `replacement (n,)` (the token at position `accepted`,
    meaningful where accepted < k).
    """
    n, k, _ = p.shape
    p_d = p.gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    keep = uniform * q_d < p_d  # u < p/q without dividing; q_d > 0 for a token drawn from q
    accepted = keep.long().cumprod(dim=1).sum(dim=1)
    at = accepted.clamp_max(k - 1)
    rows = torch.arange(n, device=p.device)
    p_at, q_at = p[rows, at], q[rows, at]
    residual = (p_at - q_at).clamp_min(0)
    # where p = q (up to rounding) a rejection has probability ~0 and the residual may vanish: draw from p
    residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_at)
    replacement = torch.multinomial(residual, 1, generator=generator)[:, 0]
    return accepted, replacement


@torch.no_grad()
def generate(
    backbone: Any,
    batch: Mapping[str, Tensor],
    policy: ExitPolicy | ScheduledExits | str | None = None,
    strategy: str = "copy",
    max_new_tokens: int = 32,
    batch_mode: str = "auto",
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    draft_layer: int | None = None,
    draft_tokens: int = 4,
    gather_min_batch: int | None = None,
    stop_at_eos: bool = True,
    candidates: int | None = None,
    check_every: int | None = None,
    record: bool = False,
    agreement: bool = False,
    rollback: float | None = None,
    count_flops: bool = False,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` tokens per row of `batch` with early exits.

    Args:
        backbone: a token-head `ExitBackbone` (T5, LLaMA).
        batch: `input_ids`, `attention_mask` `(B, S)` (sources for T5, prompts for LLaMA; right or left
            padding).
        policy: an `ExitPolicy` (measure or trained classifier, threshold, minimum exit layer, exit
            points), a schedule `"fixed:K"` / `"random:MEAN"`, or None (never exit: full model).
        strategy: ``copy``, ``parallel`` or ``self_speculative`` (see the module docstring).
        batch_mode: ``auto``, ``ride_along`` or ``gather``.
        temperature, top_p, seed: sampling (temperature 0 = greedy).
        draft_layer, draft_tokens: ``self_speculative``'s E (default L // 2) and k.
        gather_min_batch: `auto`'s crossover batch size (default: measured per device type).
        candidates: score softmax-type checks after a token's first on its top-k candidate tokens
            (a `k x d` product per check instead of the `V x d` head; see `LayerDecider`).
        check_every: check only every n-th layer from the policy's minimum exit layer.
        record: also return `records` (`ExitRecords`): every generated token's state after every layer,
            the layers past its exit run on the keys/values the strategy left (on-policy states, for
            training exit classifiers on what the decoder really shows them; costs full depth, and
            runs the `gather` batch mode so that each row keeps its own exit semantics).
        agreement: also return `agreement` (:class:`AgreementPairs`), FREE's pairs for its adaptive
            threshold, read off what decoding computes anyway: a check's score and prediction, and the
            token's last-layer prediction once its last layer runs -- at once for a token that goes the
            full depth (or rides along to it), later for an exited one, when the next token of its row
            that goes the full depth runs the waiting positions through the last layer (``parallel``
            only: ``copy`` never computes an exited token's deep states).
        rollback: FREE's RollBack (``parallel``, greedy): when the deep pass of a later token of the row
            gives an exited token's last-layer distribution and the exited token's cross-entropy under it
            exceeds `rollback` nats, that token is replaced by the last layer's prediction and what the
            row decoded after it is discarded and decoded again. 0 keeps every token the last layer
            checked equal to its prediction. FREE's code decodes one sequence; here every row rolls back
            on its own (rows then sit at their own steps), in the ``gather`` batch mode so that a row's
            tokens are checked by its own deep passes only: each row's output is what decoding it alone
            gives.
        count_flops: count the FLOPs that run (`flops`, `prefill_flops`, `flops_per_token` of the output;
            `eetrain.decoding.flops`). Counting slows the call down: its times then mean nothing.
    """
    _check(backbone, batch, strategy, batch_mode, max_new_tokens, temperature, top_p)
    counter = FlopCount() if count_flops else None
    was_training = backbone.training
    if was_training:  # eval()/train() walk every module: a cost per call at batch 1, so only when needed
        backbone.eval()
    try:
        with counter if counter is not None else contextlib.nullcontext():
            if strategy == "self_speculative":
                if policy is not None:
                    raise ConfigError(
                        "decoding.strategy=self_speculative takes no exit policy (it drafts at decoding.draft_layer "
                        "and verifies every draft with the full model); allowed with a policy: copy, parallel"
                    )
                unused = {"batch_mode": batch_mode != "auto", "record": record, "agreement": agreement,
                          "rollback": rollback is not None, "candidates": candidates is not None,
                          "check_every": check_every is not None, "gather_min_batch": gather_min_batch is not None}
                if any(unused.values()):  # each would be ignored without a word
                    raise ConfigError(
                        f"decoding.strategy=self_speculative takes no {', '.join(k for k, v in unused.items() if v)} "
                        "(it drafts every row at decoding.draft_layer and verifies with the full model); those "
                        "belong to copy and parallel"
                    )
                sampler = _Sampler(temperature, top_p, seed, batch["input_ids"].device)
                out = _self_speculative(backbone, batch, max_new_tokens, draft_layer, draft_tokens, sampler,
                                        stop_at_eos, counter)
            else:
                decoder = _decoder(backbone, batch, policy, strategy, batch_mode, temperature, top_p, seed,
                                   gather_min_batch, stop_at_eos, candidates, check_every, record, agreement, rollback)
                decoder.counter = counter
                out = decoder.run(batch, max_new_tokens)
    finally:
        if was_training:
            backbone.train()
    if counter is not None:
        out.flops, out.prefill_flops = counter.total, counter.marked
    return out


def _decoder(
    backbone: Any, batch: Mapping[str, Tensor], policy: Any, strategy: str, batch_mode: str, temperature: float,
    top_p: float, seed: int, gather_min_batch: int | None, stop_at_eos: bool, candidates: int | None,
    check_every: int | None, record: bool, agreement: bool, rollback: float | None,
) -> _Decoder:
    """`generate`'s arguments checked against each other, as the decoder of one call (`copy`, `parallel`)."""
    decider = _as_decider(policy, backbone, seed, candidates, check_every)
    if agreement and (strategy != "parallel" or not isinstance(decider, LayerDecider) or decider.policy is None
                      or not is_confidence(decider.policy)):
        raise ConfigError(
            "agreement pairs need strategy=parallel (its deep pass gives an exited token's last-layer "
            f"prediction) and an exit policy scoring a confidence in [0, 1]; got strategy={strategy!r}, policy "
            f"{describe(decider.policy if isinstance(decider, LayerDecider) else decider)}"
        )
    size = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    if rollback is not None:
        _check_rollback(rollback, strategy, decider, temperature, record)
    if gather_min_batch is not None and (isinstance(gather_min_batch, bool) or not isinstance(gather_min_batch, int)
                                         or gather_min_batch < 1):
        raise ConfigError(f"decoding.gather_min_batch={gather_min_batch!r}; allowed: null (the measured crossover) "
                          "or an integer >= 1")
    if batch_mode == "auto":
        crossover = gather_min_batch if gather_min_batch is not None else GATHER_MIN_BATCH.get(device.type, 64)
        batch_mode = "gather" if size >= crossover else "ride_along"
    sampler = _Sampler(temperature, top_p, seed, device)
    if record or rollback is not None:  # each row on its own: its own exits, its own deep passes
        batch_mode = "gather"
    return _Decoder(backbone, decider, strategy, batch_mode, sampler, stop_at_eos, record=record,
                    agreement=agreement, rollback=rollback)


def check_rollback(rollback: Any, strategy: str, temperature: float) -> float:
    """`decoding.rollback` as a float, else a ConfigError naming the key and what is allowed."""
    key = "decoding.rollback"
    if isinstance(rollback, bool) or not isinstance(rollback, int | float) or not rollback >= 0:
        raise ConfigError(f"{key}={rollback!r}; allowed: null (off) or a cross-entropy in nats >= 0")
    if strategy != "parallel":
        raise ConfigError(f"{key} needs decoding.strategy=parallel (only its deep pass checks exited tokens); "
                          f"got {strategy!r}")
    if temperature:
        raise ConfigError(f"{key}: greedy decoding only (decoding.temperature=0; got {temperature})")
    return float(rollback)


def _check_rollback(rollback: Any, strategy: str, decider: Any, temperature: float, record: bool) -> None:
    check_rollback(rollback, strategy, temperature)
    if not isinstance(decider, LayerDecider) or decider.policy is None:
        raise ConfigError("decoding.rollback needs an exit policy (without one no token exits, nothing to roll back)")
    if record:
        raise ConfigError("decoding.rollback: not with record=True (on-policy records decode without rollbacks)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Decoder:
    """One call's state: caches, per-slot depth bookkeeping (host), decisions."""

    def __init__(
        self, backbone: Any, decider: Any, strategy: str, mode: str, sampler: _Sampler, stop: bool, record: bool = False,
        agreement: bool = False, rollback: float | None = None,
    ):
        self.bb, self.decider, self.strategy, self.mode = backbone, decider, strategy, mode
        self.counter: FlopCount | None = None  # counting FLOPs: marks the end of the prefill
        self.rollback = rollback
        self.rolled_back: dict[int, tuple[int, int]] = {}  # row -> (step, the last layer's token) to go back to
        self.rollbacks = self.discarded = 0
        self.record = record
        # agreement pairs: (row, step) -> [(layer, score, prediction)] of checks waiting for the token's
        # last-layer prediction; resolved ones in `pairs` as (score, agrees, row, step, layer)
        self.agreement = agreement
        self.checks_of: dict[tuple[int, int], list[tuple[int, float, int]]] = {}
        self.pairs: list[tuple[float, bool, int, int, int]] = []
        self.recorded: list[tuple[Tensor, int, np.ndarray]] = []  # (states (L, n, d), step, rows)
        self.sample, self.stop = sampler, stop
        self.L = backbone.num_layers
        self.decision_seconds = self.layer_seconds = self.head_seconds = 0.0
        self.layer_calls = 0
        self.candidates: Tensor | None = None

    # --- the waiting positions of skipped layers -----------------------------------------------
    def _pending(self, rows: np.ndarray, slot: int | np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Positions of `rows` (before `slot`, one for all or one per row) whose keys/values at `layer` are
        not written yet, as (index into `rows`, slot) pairs, or None."""
        if isinstance(slot, int):
            sub = self.depth[rows, :slot] < layer
        else:
            width = int(slot.max())
            sub = (self.depth[rows, :width] < layer) & (np.arange(width)[None, :] < slot[:, None])
        if not sub.any():
            return None
        return np.nonzero(sub)

    @staticmethod
    def _padded(ri: np.ndarray, si: np.ndarray, nrows: int, slot: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pairs as `(nrows, P)` slots and mask, P the most any row has (padding points at the row's
        `slot`)."""
        counts = np.bincount(ri, minlength=nrows)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        col = np.arange(len(ri)) - starts
        width = int(counts.max())
        slots = (np.full((nrows, width), slot, dtype=np.int64) if isinstance(slot, int)
                 else np.repeat(slot[:, None].astype(np.int64), width, axis=1))
        mask = np.zeros(slots.shape, dtype=bool)
        slots[ri, col] = si
        mask[ri, col] = True
        return slots, mask

    def _layer(self, layer: int, rows: np.ndarray | None, slot: int, h: Tensor) -> Tensor:
        """Run `layer` for the current tokens `h (b, d)` of `rows` (None = all) at `slot`, first
        handling the positions of those rows that wait for this layer. Returns `(b, d)`."""
        t0 = time.perf_counter()
        out = self._run_layer(layer, rows, slot, h)
        self.layer_seconds += time.perf_counter() - t0
        self.layer_calls += 1
        return out

    def _run_layer(self, layer: int, rows: np.ndarray | None, slot: int | np.ndarray, h: Tensor) -> Tensor:
        """`slot`: the current tokens' cache slot, one for every row, or per row `(B,)` once a rollback has
        sent some rows back."""
        bb, ctx, dev = self.bb, self.ctx, self.device
        row_ids = np.arange(self.B) if rows is None else rows
        rows_t = None if rows is None else torch.from_numpy(rows).to(dev)
        row_slot = slot if isinstance(slot, int) else slot[row_ids]
        at = row_slot if isinstance(row_slot, int) else torch.from_numpy(row_slot[:, None]).to(dev)
        pend = self._pending(row_ids, row_slot, layer) if self.pend_state is not None else None
        if pend is None:
            return bb.decode_layer(ctx, layer, h[:, None], rows_t, at)[:, 0]
        ri, si = pend
        if self.strategy == "copy":
            # keys/values only, position by position: a flat list of (row, slot) pairs, no padding
            flat_rows = torch.from_numpy(row_ids[ri]).to(dev)
            flat_slots = torch.from_numpy(si).to(dev)
            copied = Copied(self.pend_state[flat_rows, flat_slots], flat_rows, flat_slots)
            out = bb.decode_layer(ctx, layer, h[:, None], rows_t, at, copy_kv=copied)[:, 0]
        else:  # parallel: the waiting positions and the new token in one causal pass
            slots_np, mask_np = self._padded(ri, si, len(row_ids), row_slot)
            row_idx = torch.from_numpy(row_ids).to(dev)
            slots = torch.from_numpy(slots_np).to(dev)
            mask = torch.from_numpy(mask_np).to(dev)
            waiting = self.pend_state[row_idx[:, None], slots]  # (b, P, d)
            queries = torch.cat([waiting, h[:, None]], dim=1)
            current = (torch.full_like(slots[:, :1], row_slot) if isinstance(row_slot, int)
                       else torch.from_numpy(row_slot[:, None]).to(dev))
            all_slots = torch.cat([slots, current], dim=1)
            all_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            res = bb.decode_layer(ctx, layer, queries, row_idx, all_slots, all_mask)
            done = res[:, :-1][mask]
            self.pend_state[row_idx[:, None].expand_as(slots)[mask], slots[mask]] = done
            out = res[:, -1]
            if layer == self.L and (self.agreement or self.rollback is not None):
                steps = si - self.slot0  # (row, slot) pairs in the order of `done`
                deep_logits = bb.exit_logits(done, self.L)
                if self.agreement:
                    self._resolve(row_ids[ri], steps, done, deep_logits)
                if self.rollback is not None:
                    self._check_rollback(row_ids[ri], steps, deep_logits)
        self.depth[row_ids[ri], si] = layer
        return out

    def _decide(self, layer: int, h: Tensor, rows: np.ndarray) -> tuple[np.ndarray, Tensor | None]:
        """Exit decisions at `layer` for the deciding `rows` (states `h (n, d)`): `(n,)` bool, and the
        exit head's logits `(n, V)` when the measure computed them (else the head runs once per step,
        for every row that exited without them: one read of its weights, not one per layer)."""
        if isinstance(self.decider, ScheduledExits):
            return self.schedule[rows] == layer, None  # a schedule costs nothing to decide
        t0 = time.perf_counter()
        fires = self.decider.decide(layer, h, None if len(rows) == self.B else torch.from_numpy(rows).to(self.device))
        if fires is None:
            fires = np.zeros(len(rows), dtype=bool)
        logits, self.candidates = self.decider.last_logits, self.decider.last_candidates
        self.decision_seconds += time.perf_counter() - t0
        if self.agreement and self.decider.last_scores is not None:
            self._log_checks(layer, h, rows)
        return fires, logits

    def _log_checks(self, layer: int, h: Tensor, rows: np.ndarray) -> None:
        """Keep each checked row's score and prediction at `layer` until its token's last layer runs."""
        logits = self.decider.last_logits
        if logits is None:  # a classifier or saturation: the head only for the pairs
            pred = self.bb.exit_logits(h, layer).argmax(dim=-1)
        else:
            pred = logits.argmax(dim=-1)
            if self.decider.last_candidates is not None:
                pred = self.decider.last_candidates.gather(1, pred[:, None])[:, 0]
        for r, score, p in zip(rows.tolist(), self.decider.last_scores.tolist(), pred.tolist(), strict=True):
            self.checks_of.setdefault((r, int(self.row_step[r])), []).append((layer, score, p))

    def _check_rollback(self, rows: np.ndarray, steps: np.ndarray, deep_logits: Tensor) -> None:
        """FREE's RollBack: per row, the first waiting token (pairs in row, then slot order) whose
        cross-entropy under its last-layer logits `(n, V)` exceeds the limit is to be replaced by the
        last layer's prediction."""
        dev = deep_logits.device
        emitted = self.tokens[torch.from_numpy(rows).to(dev), torch.from_numpy(steps).to(dev)]
        logp = torch.log_softmax(deep_logits.float(), dim=-1)
        over = (-logp.gather(1, emitted[:, None])[:, 0] > self.rollback).cpu().numpy()
        for j in np.flatnonzero(over):
            if int(rows[j]) not in self.rolled_back:
                self.rolled_back[int(rows[j])] = (int(steps[j]), int(logp[j].argmax()))

    def _head(self) -> None:
        """The exit head once for every row that left without logits (one read of its weights per step)."""
        if not self.need_head.any():
            return
        t0 = time.perf_counter()
        idx = torch.from_numpy(np.flatnonzero(self.need_head)).to(self.device)
        at = torch.from_numpy(self.exit_at[self.need_head]).to(self.device)
        self.new_tok[idx] = self.sample(self.bb.exit_logits_at(self.exit_h[idx], at))
        self.need_head[:] = False
        self.head_seconds += time.perf_counter() - t0

    def _roll_back_first(self, live: np.ndarray) -> None:
        """LLaMA's first tokens: the prefill ran the last layer on their input, so an exited one is checked
        at once (nothing was decoded after it): above the limit, it becomes the last layer's token."""
        self._head()  # their tokens are needed now
        rows = live[(self.exit_at[live] > 0) & (self.exit_at[live] < self.L)]
        if not len(rows):
            return
        idx = torch.from_numpy(rows).to(self.device)
        logp = torch.log_softmax(self.bb.exit_logits(self.ctx.prefill_states[-1][idx], self.L).float(), dim=-1)
        over = (-logp.gather(1, self.new_tok[idx][:, None])[:, 0] > self.rollback).cpu().numpy()
        if over.any():
            hit = torch.from_numpy(over).to(self.device)
            self.new_tok[idx[hit]] = logp[hit].argmax(dim=-1)
            self.exit_at[rows[over]] = self.L
            self.rollbacks += int(over.sum())

    def _roll_back(self, r: int, p: int, token: int, exits: Tensor) -> None:
        """Row `r`'s token `p` becomes the last layer's `token`; the tokens after it are discarded (their
        cache slots count as never written, their waiting checks are dropped) and the row goes on at p + 1."""
        self.rollbacks += 1
        self.discarded += int(self.row_step[r]) - p  # the tokens after p and the one this step was decoding
        self.tokens[r, p] = token
        self.tokens[r, p + 1 :] = self.bb.pad_token_id
        exits[r, p] = self.L  # the token is now the last layer's
        exits[r, p + 1 :] = 0
        self.depth[r, self.slot0 + p + 1 :] = 0  # inputs of discarded tokens: to be decoded again
        self.checks_of = {k: v for k, v in self.checks_of.items() if k[0] != r or k[1] <= p}
        self.row_step[r] = p + 1

    def _resolve(self, rows: np.ndarray, steps: np.ndarray, states: Tensor | None, logits: Tensor | None = None,
                 preds: list[int] | None = None) -> None:
        """The last-layer states `(n, d)` of the tokens at (`rows`, `steps`) (or their logits, or their
        predictions): their checks become pairs."""
        if preds is None:
            preds = (self.bb.exit_logits(states, self.L) if logits is None else logits).argmax(dim=-1).tolist()
        for r, t, d in zip(rows.tolist(), steps.tolist(), preds, strict=True):
            for layer, score, p in self.checks_of.pop((r, t), ()):
                self.pairs.append((score, p == d, r, t, layer))

    def agreement_pairs(self) -> AgreementPairs | None:
        if not self.agreement:
            return None
        score, agree, rows, steps, layers = (list(x) for x in zip(*self.pairs, strict=True)) if self.pairs else ([],) * 5
        return AgreementPairs(
            confidence=torch.tensor(score, dtype=torch.float64), agree=torch.tensor(agree, dtype=torch.bool),
            rows=torch.tensor(rows, dtype=torch.long), positions=torch.tensor(steps, dtype=torch.long) + 1,
            layers=torch.tensor(layers, dtype=torch.long),
        )

    def _exit(self, layer: int, h: Tensor, rows: np.ndarray, fires: np.ndarray, logits: Tensor | None) -> None:
        """Record that the `fires` among `rows` (states `h (n, d)`) leave at `layer`."""
        if not fires.any():
            return
        hit = rows[fires]
        sel = torch.from_numpy(fires).to(self.device)
        idx = torch.from_numpy(hit).to(self.device)
        if logits is not None:
            choice = self.sample(logits[sel])
            if self.candidates is not None:  # logits over each row's candidate tokens
                choice = self.candidates[sel].gather(1, choice[:, None])[:, 0]
            self.new_tok[idx] = choice
        else:
            self.exit_h[idx] = h[sel]
            self.need_head[hit] = True
        self.exit_at[hit] = layer
        self.deciding[hit] = False

    def _record_rest(
        self, states: Tensor, h: Tensor, reached: np.ndarray, live: np.ndarray, slot: int, step: int
    ) -> None:
        """On-policy records: run each live row's token on through the layers past its exit, reading the
        keys/values the strategy left, and keep its state after every layer `states (L, B, d)`.

        The extra layers only observe: the slot's depth stays at the exit, so the strategy later
        overwrites the keys/values written here (copy: projections of the exit state)."""
        h, reached = h.clone(), reached.copy()
        for layer in range(1, self.L + 1):
            rows = live[reached[live] < layer]
            if len(rows) == 0:
                continue
            idx = torch.from_numpy(rows).to(h.device)
            out = self._layer(layer, None if len(rows) == self.B else rows, slot, h[idx])
            h[idx] = out
            states[layer - 1, idx] = out
            reached[rows] = layer
        self.recorded.append((states[:, live], step, live))

    def records(self) -> ExitRecords | None:
        """What `record=True` kept: `hidden (L, N, d)`, per-layer `predictions (L, N)`, positions, rows."""
        if not self.recorded:
            return None
        hidden = torch.cat([states for states, _, _ in self.recorded], dim=1)
        with torch.no_grad():
            predictions = torch.stack([self.bb.exit_logits(hidden[i], i + 1).argmax(dim=-1)
                                       for i in range(hidden.shape[0])])
        positions = torch.cat([torch.full((len(rows),), step + 1) for _, step, rows in self.recorded])
        rows = torch.cat([torch.from_numpy(rows) for _, _, rows in self.recorded])
        return ExitRecords(hidden=hidden.cpu(), predictions=predictions.cpu(), positions=positions.long(),
                           sequence_ids=rows.long())

    def run(self, batch: Mapping[str, Tensor], max_new: int) -> GenerateOutput:
        bb = self.bb
        self.device = dev = batch["input_ids"].device
        _sync(dev)
        start = time.perf_counter()
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        ctx = self.ctx = bb.decode_init(inputs, max_new)
        prefill_seconds = time.perf_counter() - start
        if self.counter is not None:
            self.counter.mark()
        prefilled = ctx.prefill_states is not None
        B = self.B = ctx.batch_size
        L = self.L
        pad, eos = bb.pad_token_id, (bb.eos_token_id if self.stop else None)
        self.depth = np.zeros((B, ctx.max_slots), dtype=np.int64)
        self.depth[:, : ctx.first_slot] = L  # prompt positions (and their padding): every layer computed
        like = ctx.k[0]
        self.pend_state = None
        if self.strategy in ("copy", "parallel"):
            self.pend_state = like.new_zeros((B, ctx.max_slots, bb.hidden_size))
        self.exit_h = like.new_zeros((B, bb.hidden_size))
        if self.rollback is not None:
            # once a row goes back, rows sit at different slots and a row's attention spans slots only rows
            # ahead of it have reached: masked, but a masked weight (0) times uninitialised memory (NaN) is NaN
            for cache in (*ctx.k, *ctx.v):
                cache[:, :, ctx.first_slot :].zero_()
        tokens = torch.full((B, max_new), pad, dtype=torch.long, device=dev)
        exits = torch.zeros((B, max_new), dtype=torch.long, device=dev)
        done = np.zeros(B, dtype=bool)
        batch_max: list[int] = []
        scheduled = isinstance(self.decider, ScheduledExits)
        self.slot0 = ctx.first_slot - (1 if prefilled else 0)  # step t's token sits at slot slot0 + t
        self.tokens = tokens
        # each row's next token: rows share it until a rollback sends one back (then slots go per row)
        row_step = self.row_step = np.zeros(B, dtype=np.int64)
        first = True
        while True:
            done |= row_step >= max_new
            live = np.flatnonzero(~done)
            if len(live) == 0:
                break
            step = int(row_step[live[0]])
            same = bool((row_step[live] == step).all())
            self.resolve_own = np.zeros(0, dtype=np.int64)
            positions = torch.from_numpy(row_step + 1)
            if scheduled:
                self.schedule = self.decider.draw(B).numpy()
            self.exit_at = np.zeros(B, dtype=np.int64)
            self.need_head = np.zeros(B, dtype=bool)
            self.new_tok = torch.full((B,), pad, dtype=torch.long, device=dev)
            self.deciding = ~done
            if first and prefilled:
                # LLaMA: the prompt's prefill computed every layer; decide on its last position's states
                if not scheduled:
                    self.decider.begin(positions, ctx.prefill_input)
                for layer in range(1, L + 1):
                    rows = np.flatnonzero(self.deciding)
                    if len(rows) == 0:
                        break
                    h = ctx.prefill_states[layer - 1][torch.from_numpy(rows).to(dev)]
                    if layer == L:
                        self._exit(layer, h, rows, np.ones(len(rows), dtype=bool), None)
                    else:
                        self._exit(layer, h, rows, *self._decide(layer, h, rows))
                if self.record:
                    self.recorded.append((torch.stack(ctx.prefill_states)[:, live], step, live))
                if self.agreement:  # the prefill ran every layer
                    self._resolve(live, row_step[live], ctx.prefill_states[-1][torch.from_numpy(live).to(dev)])
                if self.rollback is not None:  # the first tokens' last layer already ran: check them at once
                    self._roll_back_first(live)
            else:
                if same:
                    slot: int | np.ndarray = self.slot0 + step
                    ids = ctx.start_ids if step == 0 else tokens[:, step - 1]
                else:  # rows at their own steps (all past the first); ended rows point at any valid slot
                    slot = np.minimum(self.slot0 + row_step, ctx.max_slots - 1)
                    back = torch.from_numpy(np.clip(row_step - 1, 0, max_new - 1)).to(dev)
                    ids = tokens.gather(1, back[:, None])[:, 0]
                h_cur = bb.decode_embed(ids[:, None])[:, 0]
                if not scheduled:
                    self.decider.begin(positions, h_cur)
                reached = np.zeros(B, dtype=np.int64)
                states = h_cur.new_zeros((L, B, h_cur.shape[-1])) if self.record else None
                for layer in range(1, L + 1):
                    if not self.deciding.any():
                        break
                    if self.mode == "ride_along":
                        h_cur = self._layer(layer, None, slot, h_cur)
                        reached[:] = layer
                        h = h_cur
                    else:
                        rows = np.flatnonzero(self.deciding)
                        if len(rows) == B:
                            h = h_cur = self._layer(layer, None, slot, h_cur)
                        else:
                            idx = torch.from_numpy(rows).to(dev)
                            h = self._layer(layer, rows, slot, h_cur.index_select(0, idx))
                            h_cur = h_cur.index_copy(0, idx, h)
                        reached[rows] = layer
                    if self.rolled_back:  # (gather) these rows go back: their current token is dropped
                        self.deciding[list(self.rolled_back)] = False
                    if states is not None:
                        states[layer - 1] = h_cur
                    dec_rows = np.flatnonzero(self.deciding)
                    if len(dec_rows) < len(h):  # the rows still deciding
                        pick = dec_rows if len(h) == B else np.searchsorted(rows, dec_rows)
                        h = h.index_select(0, torch.from_numpy(pick).to(dev))
                    if layer == L:
                        self._exit(layer, h, dec_rows, np.ones(len(dec_rows), dtype=bool), None)
                    else:
                        self._exit(layer, h, dec_rows, *self._decide(layer, h, dec_rows))
                if states is not None:
                    self._record_rest(states, h_cur, reached, live, slot, step)
                if self.agreement:  # tokens that went (or rode along) the full depth this step
                    deep = live[(reached[live] == L) & ~np.isin(live, list(self.rolled_back))]
                    # greedy, a token that left at L is its own last-layer prediction: resolved below
                    own = self.exit_at[deep] == L if self.sample.generator is None else np.zeros(len(deep), bool)
                    ride, self.resolve_own = deep[~own], deep[own]
                    if len(ride):
                        self._resolve(ride, row_step[ride], h_cur[torch.from_numpy(ride).to(dev)])
                # the current positions wait with the state they reached (rows already ended: never)
                reached[done] = L
                if same:
                    if self.pend_state is not None:
                        self.pend_state[:, slot] = h_cur
                    self.depth[:, slot] = reached
                else:
                    if self.pend_state is not None:
                        self.pend_state[torch.arange(B, device=dev), torch.from_numpy(slot).to(dev)] = h_cur
                    self.depth[np.arange(B), slot] = reached
            first = False
            self._head()
            new_tok, exit_at = self.new_tok, self.exit_at
            if self.agreement and len(self.resolve_own):
                own = self.resolve_own
                self._resolve(own, row_step[own], None, preds=new_tok[torch.from_numpy(own).to(dev)].tolist())
            going = live[~np.isin(live, list(self.rolled_back))] if self.rolled_back else live
            batch_max.append(int(exit_at[live].max()))
            if same and len(going) == len(live) and bool((row_step[done] <= step).all()):
                # every row at this step or ended before it: one column (ended rows get padding)
                new_tok[torch.from_numpy(done).to(dev)] = pad
                tokens[:, step] = new_tok
                exit_at[done] = 0
                exits[:, step] = torch.from_numpy(exit_at).to(dev)
            else:
                g = torch.from_numpy(going).to(dev)
                at_step = torch.from_numpy(row_step[going]).to(dev)
                tokens[g, at_step] = new_tok[g]
                exits[g, at_step] = torch.from_numpy(exit_at[going]).to(dev)
            row_step[going] += 1
            if eos is not None:
                ended = np.zeros(B, dtype=bool)
                ended[going] = (new_tok[torch.from_numpy(going).to(dev)] == eos).cpu().numpy()
                done |= ended
                self.depth[ended] = L  # an ended row's positions are never attended again
            for r, (p, token) in self.rolled_back.items():
                self._roll_back(r, p, token, exits)
                if eos is not None and token == eos:
                    done[r] = True
                    self.depth[r] = L
            self.rolled_back = {}
        _sync(dev)
        seconds = time.perf_counter() - start
        lengths = (exits > 0).sum(dim=1).cpu()
        steps = max(1, min(max_new, int(row_step.max())))
        return GenerateOutput(
            tokens=tokens[:, :steps].cpu(),
            exit_layers=exits[:, :steps].cpu(),
            lengths=lengths,
            num_layers=L,
            seconds=seconds,
            decision_seconds=self.decision_seconds,
            prefill_seconds=prefill_seconds,
            layer_seconds=self.layer_seconds,
            head_seconds=self.head_seconds,
            layer_calls=self.layer_calls,
            checks=getattr(self.decider, "checks", 0),
            records=self.records(),
            agreement=self.agreement_pairs(),
            rollbacks=self.rollbacks,
            discarded_tokens=self.discarded,
            policy=describe(self.decider.policy if isinstance(self.decider, LayerDecider) else self.decider),
            strategy=self.strategy,
            batch_mode=self.mode,
            batch_max_exit_layers=batch_max,
        )


def _self_speculative(
    backbone: Any,
    batch: Mapping[str, Tensor],
    max_new: int,
    draft_layer: int | None,
    draft_tokens: int,
    sampler: _Sampler,
    stop_at_eos: bool,
    counter: FlopCount | None = None,
) -> GenerateOutput:
    """LayerSkip's self-speculative decoding, every row at once.

    Each round, every unfinished row drafts k tokens with layers 1..E and the head at E (one batched
    call per layer and draft step) and verifies them with layers E+1..L in one batched call over its k
    positions; each row keeps its own accepted prefix and the correction, so rows move on by different
    amounts and sit at their own cache slots (per-row slots). Lossless: greedy, a row's output is full
    greedy; sampling, drafts come from the layer-E distribution and `speculative_accept` keeps them so
    that a row's tokens are distributed as the full model's samples.

    No "bonus" token when all k drafts pass (the full model's next token after the last draft, which a
    separate draft model's verifier gets for one more position): here it needs the last draft's layers
    1..E, one more draft step, and that step spent on a (k+1)-th draft gives the same tokens (the first k
    drafts are the same; the (k+1)-th is kept or replaced by that very token) for one more draft-head
    product: `draft_tokens=k+1` is the bonus.
    """
    L = backbone.num_layers
    E = L // 2 if draft_layer is None else draft_layer
    if isinstance(E, bool) or not isinstance(E, int) or not 1 <= E < L:
        raise ConfigError(
            f"decoding.draft_layer={draft_layer!r}; allowed: 1..{L - 1} (below the model's {L} layers)"
        )
    if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 1:
        raise ConfigError(f"decoding.draft_tokens={draft_tokens!r}; allowed: an integer >= 1")
    k = draft_tokens
    sampling = sampler.generator is not None
    dev = batch["input_ids"].device
    pad = backbone.pad_token_id
    eos = backbone.eos_token_id if stop_at_eos else None
    _sync(dev)
    start = time.perf_counter()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    ctx = backbone.decode_init(inputs, max_new + k)  # drafts may run k - 1 slots past the last kept token
    prefill_seconds = time.perf_counter() - start
    if counter is not None:
        counter.mark()
    layer_seconds = head_seconds = 0.0
    layer_calls = 0
    B = ctx.batch_size
    # Rows sit at different slots, so a row's attention spans slots that only rows ahead of it have
    # written: masked, but a masked weight (0) times uninitialised memory (NaN, inf) is still NaN.
    for cache in (*ctx.k, *ctx.v):
        cache[:, :, ctx.first_slot :].zero_()
    out: list[list[int]] = [[] for _ in range(B)]
    layer_of: list[list[int]] = [[] for _ in range(B)]
    if ctx.prefill_states is not None:  # LLaMA: the prompt's prefill gave the first token at full depth
        nxt = sampler(backbone.exit_logits(ctx.prefill_states[-1]))
        for r, tok in enumerate(nxt.tolist()):
            out[r].append(tok)
            layer_of[r].append(L)
    else:
        nxt = ctx.start_ids.clone()
    slot = torch.full((B,), ctx.first_slot, dtype=torch.long, device=dev)

    def finished(r: int) -> bool:
        return len(out[r]) >= max_new or (eos is not None and bool(out[r]) and out[r][-1] == eos)

    offsets = torch.arange(k, device=dev)
    while True:
        rows = [r for r in range(B) if not finished(r)]
        if not rows:
            break
        idx = torch.tensor(rows, device=dev)
        sub = None if len(rows) == B else idx
        base, x = slot[idx], nxt[idx]
        drafts, states, draft_probs = [], [], []
        for i in range(k):  # draft with layers 1..E
            h = backbone.decode_embed(x[:, None])
            t0 = time.perf_counter()
            for layer in range(1, E + 1):
                h = backbone.decode_layer(ctx, layer, h, sub, (base + i)[:, None])
            t1 = time.perf_counter()
            states.append(h)
            logits = backbone.exit_logits(h[:, 0], E)
            head_seconds += time.perf_counter() - t1
            layer_seconds += t1 - t0
            layer_calls += E
            if sampling:
                draft_probs.append(sampler.probs(logits))
                x = torch.multinomial(draft_probs[-1], 1, generator=sampler.generator)[:, 0]
            else:
                x = logits.argmax(dim=-1)
            drafts.append(x)
        h = torch.cat(states, dim=1)  # (n, k, d): layer-E states of the inputs at base..base+k-1
        t0 = time.perf_counter()
        for layer in range(E + 1, L + 1):  # verify every row's drafts with the deep layers in one pass
            h = backbone.decode_layer(ctx, layer, h, sub, base[:, None] + offsets)
        t1 = time.perf_counter()
        full = backbone.exit_logits(h.reshape(-1, h.shape[-1])).view(len(rows), k, -1)
        head_seconds += time.perf_counter() - t1
        layer_seconds += t1 - t0
        layer_calls += L - E
        draft = torch.stack(drafts, dim=1)
        if sampling:
            uniform = torch.rand(draft.shape, generator=sampler.generator, device=dev)
            agreed_t, fix = speculative_accept(sampler.probs(full), torch.stack(draft_probs, dim=1), draft, uniform,
                                               sampler.generator)
        else:
            best = full.argmax(dim=-1)
            agreed_t = (draft == best).long().cumprod(dim=1).sum(dim=1)  # each row's accepted prefix
            fix = best.gather(1, agreed_t.clamp_max(k - 1)[:, None])[:, 0]  # the full model's token there
        agreed, draft_l, fix_l = agreed_t.tolist(), draft.tolist(), fix.tolist()
        for j, r in enumerate(rows):
            m = agreed[j]
            accepted = draft_l[j][:m] + ([fix_l[j]] if m < k else [])
            layers = [E] * m + ([L] if m < k else [])
            for tok, lay in zip(accepted, layers, strict=True):
                if finished(r):
                    break
                out[r].append(tok)
                layer_of[r].append(lay)
            slot[r] += len(accepted)
            nxt[r] = accepted[-1]
    width = max(1, max(len(o) for o in out))
    tokens = torch.full((B, width), pad, dtype=torch.long)
    exits = torch.zeros((B, width), dtype=torch.long)
    for r in range(B):
        tokens[r, : len(out[r])] = torch.tensor(out[r], dtype=torch.long)
        exits[r, : len(out[r])] = torch.tensor(layer_of[r], dtype=torch.long)
    _sync(dev)
    seconds = time.perf_counter() - start
    return GenerateOutput(
        tokens=tokens,
        exit_layers=exits,
        lengths=(exits > 0).sum(dim=1),
        num_layers=L,
        seconds=seconds,
        decision_seconds=0.0,
        prefill_seconds=prefill_seconds,
        layer_seconds=layer_seconds,
        head_seconds=head_seconds,  # the drafts' and the verification's head
        layer_calls=layer_calls,
        policy=f"draft:{E}x{k}",
        strategy="self_speculative",
        batch_mode="batched",  # every row at once, each at its own slots
        batch_max_exit_layers=exits.max(dim=0).values.tolist(),  # per token position, over the rows
    )
