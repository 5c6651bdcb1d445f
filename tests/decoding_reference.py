"""A slow reference decoder for the exactness tests: no cache, everything recomputed at every step.

At each step the whole sequence so far is run through the Hugging Face model (teacher forcing on the
tokens generated so far); the new token's exit layer is chosen by `eetrain.exits.policy.exit_layers`
on its states of every layer (or taken from a schedule), and the token is the exit head's argmax.

Strategy semantics: `exact` (the deep layers of every earlier position are the real ones: what
`parallel` and `ride_along` promise) or `copy` (CALM: at layers above a position's exit, that position
carries its exit state, so those layers' keys/values are projections of the exit state; done with
forward hooks that hand a block's input through as its output at those positions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from eetrain.exits.classifiers import feature_states
from eetrain.exits.policy import ExitPolicy, exit_layers


def _block_input(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def reference_generate(
    backbone,
    source: list[int],
    max_new_tokens: int,
    semantics: str,
    decide: ExitPolicy | Callable[[int], int] | None,
    states_out: list | None = None,
) -> tuple[list[int], list[int]]:
    """Greedy tokens and exit layers for one prompt/source (no padding, no stop at end of sequence).

    states_out: if given, each step's `(L, d)` states of the new token are appended to it."""
    L = backbone.num_layers
    family = backbone.family
    gen: list[int] = []
    exits: list[int] = []
    depth: dict[int, int] = {}  # position -> layers it really computed (absent: all)
    for step in range(max_new_tokens):
        if family == "t5":
            batch = backbone.collate([{"source_ids": source, "target_ids": gen + [0]}])
            pos = len(gen)  # decoder input at pos produces the next token
            for p, e in enumerate(exits):
                depth[p] = e
        else:
            batch = backbone.collate([{"source_ids": source, "target_ids": gen + [0]}])
            pos = len(source) + len(gen) - 1
            for i, e in enumerate(exits[1:]):  # generated token i+1 is the input at len(source)+i
                depth[len(source) + i] = e
        handles = []
        captured = {}

        def pre_hook(_m, args, kwargs, captured=captured):
            captured["h0"] = _block_input(args, kwargs)

        handles.append(backbone.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        if semantics == "copy":
            for j in range(1, L + 1):
                positions = [p for p, e in depth.items() if e < j and p < pos]
                if not positions:
                    continue

                def hook(_m, args, kwargs, output, positions=positions):
                    inp = _block_input(args, kwargs)
                    out = output[0] if isinstance(output, tuple) else output
                    out = out.clone()
                    out[:, positions] = inp[:, positions]
                    return (out, *output[1:]) if isinstance(output, tuple) else out

                handles.append(backbone.blocks[j - 1].register_forward_hook(hook, with_kwargs=True))
        try:
            with torch.no_grad():
                states = backbone(batch)
        finally:
            for h in handles:
                h.remove()
        hidden = torch.stack([h[0, pos] for h in states.hidden])  # (L, d)
        if states_out is not None:
            states_out.append(hidden)
        h0 = captured["h0"][0, pos]
        if decide is None:
            e = L
        elif isinstance(decide, ExitPolicy):
            with torch.no_grad():
                logits = torch.stack([backbone.exit_logits(hidden[i], i + 1) for i in range(L)])
                # classifiers / saturation read the policy's space, as record_exits records it
                feats, f0 = (feature_states(backbone, x, decide.features) for x in (hidden, h0))
            e = int(
                exit_layers(
                    decide,
                    hidden=feats[:, None],
                    logits=logits[:, None],
                    h0=f0[None],
                    positions=torch.tensor([step + 1]),
                )[0]
            )
        else:
            e = int(decide(step))
        with torch.no_grad():
            tok = int(backbone.exit_logits(hidden[e - 1], e).argmax())
        gen.append(tok)
        exits.append(e)
    return gen, exits
