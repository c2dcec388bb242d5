"""Recording the experts each token is routed to, and replaying them (R3).

Both are applied to a model from outside, as forward hooks on the routers of its MoE layers
(the trunk's, in layer order; MTP modules are not part of a policy's log-probs):

    recorder = RoutingRecorder(model)      # every forward appends [N, L, K] (N = B*T tokens)
    ...decode...; steps = recorder.take(); recorder.remove()

    replay = RoutingReplay(model)          # installed once; a no-op until given experts
    replay.set(routed_BTLK)                # [B, T, L, K] expert ids of the next forwards' tokens,
    ...forward, backward...                #   -1 where the model should route by itself
    replay.clear()

A replayed token goes to the given experts; its gate weights come from the model's own
affinities at those experts (moe.replay_routing), so the gradient still reaches the router.
The replay stays set until cleared, so recomputation in backward (activation checkpointing)
replays the same experts. Everything downstream of the router sees the replayed choice: the
dispatch (and so expert parallelism's exchange and the FP8 experts), the load counts behind
the bias update, and the balance loss (affinities are the model's, the selection replayed).
"""

from __future__ import annotations

import torch
from torch import nn

from .moe import MoE, Router, Routing, replay_routing


def moe_routers(model: nn.Module) -> list[Router]:
    """The routers of the trunk's MoE layers, in layer order."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("routing replay works on the core Transformer (with .layers)")
    return [block.mlp.gate for block in layers if isinstance(block.mlp, MoE)]


class RoutingRecorder:
    """Keeps every forward's expert ids: `take()` returns one [N, L, K] tensor per forward."""

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        self._current: list[torch.Tensor] = []
        self._steps: list[torch.Tensor] = []
        self._handles = [r.register_forward_hook(self._hook(j)) for j, r in enumerate(self.routers)]

    def _hook(self, layer: int):
        def hook(module, inputs, out: Routing):
            if layer == 0 and self._current:
                raise RuntimeError("a forward skipped an MoE layer's router: routing cannot be recorded")
            self._current.append(out.idx.detach())
            if layer == len(self.routers) - 1:
                self._steps.append(torch.stack(self._current, dim=1))
                self._current = []
        return hook

    def take(self) -> list[torch.Tensor]:
        steps, self._steps = self._steps, []
        return steps

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "RoutingRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class RoutingReplay:
    """Routes the next forwards' tokens to given experts (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.routers = moe_routers(model)
        self.args = model.args
        self._idx_NLK: torch.Tensor | None = None
        self._handles = [r.register_forward_hook(self._hook(j)) for j, r in enumerate(self.routers)]

    def set(self, routed_BTLK: torch.Tensor) -> None:
        """Expert ids [B, T, L, K] (L = MoE layers, K = experts per token; -1 = not given)."""
        a = self.args
        L, K, E = len(self.routers), a.num_experts_per_tok, a.n_routed_experts
        if routed_BTLK.dim() != 4 or routed_BTLK.shape[2:] != (L, K):
            raise ValueError(f"routed experts of shape {tuple(routed_BTLK.shape)}: expected [B, T, {L}, {K}] "
                             f"({L} MoE layers, {K} experts per token)")
        idx = routed_BTLK.long()
        given = (idx >= 0).all(-1)
        if ((idx < -1) | (idx >= E)).any() or (given != (idx >= 0).any(-1)).any():
            raise ValueError(f"routed experts must be expert ids in [0, {E}) or a whole row of -1")
        ordered = idx.sort(-1).values
        if ((ordered[..., 1:] == ordered[..., :-1]) & given[..., None]).any():
            raise ValueError("routed experts name the same expert twice for one token")
        self._idx_NLK = idx.flatten(0, 1)

    def clear(self) -> None:
        self._idx_NLK = None

    def _hook(self, layer: int):
        def hook(module, inputs, out: Routing):
            if self._idx_NLK is None:
                return None
            idx = self._idx_NLK[:, layer].to(out.idx.device)
            if idx.shape[0] != out.idx.shape[0]:
                raise ValueError(f"routing replay holds {idx.shape[0]} tokens, the forward routes "
                                 f"{out.idx.shape[0]}: set() the batch being run")
            a = self.args
            return replay_routing(out, idx.clamp(min=0), idx[:, 0] >= 0, a.norm_topk_prob, a.routed_scaling_factor)
        return hook

    def remove(self) -> None:
        self.clear()
        for h in self._handles:
            h.remove()
        self._handles = []
