"""COLA, the residual chain (Xia, Qin, Hazan 2024) as a Trainer callback, and its exact export.

Training is the ordinary PEFT + Trainer run; `ColaCallback` ties a knot at each planned optimizer
step: the current link's s·BA is added to the frozen weights (in float32), A and B are
re-initialised (A Kaiming-uniform or Gaussian, B zero: the model's function is unchanged), the
link's AdamW state is dropped, and — with a rank schedule — the LoRA modules are rebuilt at the
next rank and the optimizer's parameter groups pointed at them. An optional linear LR re-warm-up
after each knot gives ReLoRA's jagged schedule.

The base stays exact: the original weights W0 of every wrapped module are copied (host memory)
at the first knot, merged weights are always recomputed as W0 + Σ_j s_j B_j A_j from the links
(no error piles up over knots, even in bf16), and W0 is copied back — never subtracted — when the
links are exported or training fails. Each link's factors are kept (float32, host memory, rank r
each), so at the end Σ_j s_j B_j A_j is written as ONE ordinary LoRA of rank Σ_j r_j (A's stacked,
scaled B's concatenated, lora_alpha = r so the scaling is 1) — or truncated to rank r by SVD with
the relative Frobenius error reported.

The LoRA modules are rebuilt with PEFT's own layer API (`LoraLayer.update_layer`, then
`reset_lora_parameters`), so a new A and B get what PEFT gives any adapter — r, lora_alpha,
scaling, requires_grad, the active adapter, the base layer's device; only the adapter dtype and
the dropout module are put back as they were (see `_rebuild`).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from chainlora.errors import ChainloraError
from chainlora.library.lora_math import peft_scale, truncate
from chainlora.train.config import ColaSettings

ADAPTER = "default"  # get_peft_model's adapter name
STATE_FILE = "cola.safetensors"  # the tied links inside each Trainer checkpoint (a persisted name)
DEFAULT_LINKS = 3


@dataclass
class LinkPlan:
    """When knots are tied and the rank of each link (len(ranks) == len(knots) + 1)."""

    knots: list[int]
    ranks: list[int]

    @property
    def links(self) -> int:
        return len(self.ranks)


def link_plan(settings: ColaSettings, steps: int, rank: int, key: str) -> LinkPlan:
    """The knots for an adapter of `steps` optimizer steps; `key` names the config section."""
    c = settings
    if c.knots is not None:
        knots = list(c.knots)
    elif c.steps_per_link is not None:
        knots = list(range(c.steps_per_link, steps, c.steps_per_link))
    else:
        links = c.links or (len(c.rank_schedule) if c.rank_schedule else DEFAULT_LINKS)
        if links > steps:
            raise ChainloraError(f"{key}.links: {links} links need at least {links} steps, the adapter has {steps}")
        knots = [round(i * steps / links) for i in range(1, links)]
    late = [k for k in knots if k >= steps]
    if late:
        raise ChainloraError(f"{key}.knots: knot at step {late[0]} is not before the adapter's last step {steps}")
    ranks = list(c.rank_schedule) if c.rank_schedule else [rank] * (len(knots) + 1)
    if len(ranks) != len(knots) + 1:
        raise ChainloraError(f"{key}.rank_schedule: {len(ranks)} ranks for {len(knots) + 1} links")
    if c.compress_rank is not None and c.compress_rank > sum(ranks):
        raise ChainloraError(f"{key}.compress_rank: {c.compress_rank} is above the links' total rank {sum(ranks)}")
    return LinkPlan(knots, ranks)


def lora_layers(model: Any) -> dict[str, Any]:
    """Every LoRA-wrapped Linear of `model`, by module name (the unit of merging); plain LoRA
    only: merging s·BA assumes no DoRA, LoRA bias or other LoRA variant (rsLoRA is plain LoRA
    with another s, read from the layer)."""
    import torch.nn as nn
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
            if not isinstance(module.lora_A[ADAPTER], nn.Linear) or getattr(module, "fan_in_fan_out", False):
                raise ChainloraError(f"cola: {name}: only Linear layers can form a residual chain (not "
                                     f"{type(module.get_base_layer()).__name__}); change lora.target_modules")
            if module.use_dora.get(ADAPTER) or module.lora_bias.get(ADAPTER) \
                    or ADAPTER in getattr(module, "lora_variant", {}):
                raise ChainloraError(f"cola: {name}: only plain LoRA layers can form a residual chain "
                                     "(no DoRA, LoRA bias or other variant)")
            layers[name] = module
    if not layers:
        raise ChainloraError("cola: the model has no LoRA layers for a residual chain")
    return layers


class ColaCallback(TrainerCallback):
    """The residual chain for one PEFT model under one Trainer (see the module docstring)."""

    def __init__(self, model: Any, link_plan: LinkPlan, settings: ColaSettings, alpha: float):
        import torch.distributed as dist

        self.model, self.link_plan, self.settings, self.alpha = model, link_plan, settings, alpha
        self.layers = lora_layers(model)
        self.links: list[dict[str, tuple[Any, Any]]] = []  # per link: module -> (A, B) float32 CPU
        self.scalings: list[float] = []
        self.w0: dict[str, Any] = {}
        if len(set(link_plan.ranks)) > 1 and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            raise ChainloraError("cola.rank_schedule: changing ranks needs a single training process "
                                 "(distributed training wraps a fixed set of parameters)")

    # ---------------------------------------------------------------- Trainer hooks

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kw):
        if self.settings.restart_warmup_steps and lr_scheduler is not None:
            self._jag(lr_scheduler)

    def on_step_end(self, args, state, control, optimizer=None, **kw):
        if state.global_step in self.link_plan.knots and len(self.links) < len(self.link_plan.knots):
            self.tie(optimizer)

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            self.save(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    # ---------------------------------------------------------------- the knot

    def _scaling(self) -> float:
        """The current link's s (uniform over modules: chainlora sets no per-module alpha)."""
        return float(next(iter(self.layers.values())).scaling[ADAPTER])

    def _current(self) -> dict[str, tuple[Any, Any]]:
        return {name: (layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
                       layer.lora_B[ADAPTER].weight.detach().float().cpu().clone())
                for name, layer in self.layers.items()}

    def _merge(self) -> None:
        """Set every wrapped weight to W0 + Σ_j s_j B_j A_j, summed in float32."""
        import torch

        with torch.no_grad():
            for name, layer in self.layers.items():
                weight = layer.get_base_layer().weight
                if name not in self.w0:
                    self.w0[name] = weight.detach().cpu().clone()
                dev = weight.device  # the products run where the weights live (GPU when there is one)
                merged = self.w0[name].to(dev, torch.float32, copy=True)  # never W0 itself
                for s, link in zip(self.scalings, self.links):
                    b, a = link[name][1].to(dev), link[name][0].to(dev)
                    merged.addmm_(b, a, alpha=s)
                weight.copy_(merged.to(weight.dtype))

    def _rebuild(self, layer: Any, rank: int, alpha: float) -> None:
        """New A (rank x in) and B (out x rank) for `layer` by PEFT's `update_layer` with the
        model's own LoraConfig: r, lora_alpha, scaling, requires_grad and the active adapter are
        PEFT's. Not initialised here (init_lora_weights=False): the caller initialises or fills them."""
        import torch

        a, b, dropout = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight, layer.lora_dropout[ADAPTER]
        config = copy.copy(self.model.peft_config[ADAPTER])
        config.init_lora_weights = False
        # nn.Linear's own init inside update_layer draws from the RNG of the device the LoRA lives
        # on, as the hand-built modules did (the same random stream, so the same numbers)
        with torch.device(a.device):
            layer.update_layer(ADAPTER, rank, alpha, config)
        # update_layer moves the adapter to the base layer's device AND dtype, undoing
        # get_peft_model's upcast (float32 LoRA on a bf16 base); PEFT has no per-layer call that
        # keeps the dtype, so the old one is restored (before any value is written)
        layer.lora_A[ADAPTER].to(dtype=a.dtype)
        layer.lora_B[ADAPTER].to(dtype=b.dtype)
        # update_layer makes a new Dropout (same p, but in training mode whatever the model's
        # mode); the old module is put back (no PEFT API for it; a Dropout holds no state)
        layer.lora_dropout[ADAPTER] = dropout

    def _new_link(self, rank: int) -> list[tuple[Any, Any]]:
        """Re-initialise every layer's A and B (rebuilt when the rank changes); return the
        (old, new) parameter pairs so the optimizer can follow."""
        import torch
        import torch.distributed as dist

        init = True if self.settings.init == "kaiming" else "gaussian"
        swaps = []
        for layer in self.layers.values():
            a, b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            if layer.r[ADAPTER] != rank:
                self._rebuild(layer, rank, self.alpha)
                swaps += [(a, layer.lora_A[ADAPTER].weight), (b, layer.lora_B[ADAPTER].weight)]
            with torch.no_grad():
                layer.reset_lora_parameters(ADAPTER, init)
                if dist.is_available() and dist.is_initialized():
                    dist.broadcast(layer.lora_A[ADAPTER].weight, src=0)  # the same link on every rank
        return swaps

    def tie(self, optimizer: Any = None) -> None:
        """Tie a knot: merge the current link into the weights and start the next one."""
        self.scalings.append(self._scaling())
        self.links.append(self._current())
        self._merge()
        swaps = self._new_link(self.link_plan.ranks[len(self.links)])
        if optimizer is not None:
            self._follow(getattr(optimizer, "optimizer", optimizer), swaps)

    def _follow(self, optimizer: Any, swaps: list[tuple[Any, Any]]) -> None:
        """Point the optimizer at rebuilt parameters and drop the new link's state."""
        new_for = {id(old): new for old, new in swaps}
        for group in optimizer.param_groups:
            group["params"] = [new_for.get(id(p), p) for p in group["params"]]
        for old, _ in swaps:
            optimizer.state.pop(old, None)
        if self.settings.reset_optimizer:
            for layer in self.layers.values():
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight):
                    optimizer.state.pop(p, None)  # AdamW starts a fresh state (step 0) lazily

    def _jag(self, scheduler: Any) -> None:
        """Multiply the schedule by a linear ramp over `restart_warmup_steps` after each knot."""
        if not hasattr(scheduler, "lr_lambdas"):
            raise ChainloraError("cola.restart_warmup_steps: needs a LambdaLR schedule "
                                 "(training.lr_scheduler linear / cosine / constant)")
        knots, warm = list(self.link_plan.knots), self.settings.restart_warmup_steps

        def jagged(inner):
            def factor(step: int) -> float:
                last = max((k for k in knots if k <= step), default=None)
                ramp = 1.0 if last is None else min(1.0, (step - last + 1) / (warm + 1))
                return inner(step) * ramp
            return factor

        # The ramp is a function of the step alone, so a resumed run gets the same schedule;
        # step 0 is never after a knot, and a resumed optimizer carries its current lr.
        scheduler.lr_lambdas = [jagged(f) for f in scheduler.lr_lambdas]

    # ---------------------------------------------------------------- checkpoints

    def save(self, directory: Path) -> None:
        """Write the tied links into a Trainer checkpoint (safetensors; atomic rename)."""
        import os

        from safetensors.torch import save_file

        tensors = {f"{i}.{name}.{part}": t.contiguous()
                   for i, link in enumerate(self.links) for name, ab in link.items()
                   for part, t in zip("AB", ab)}
        meta = {"links": str(len(self.links)), "scalings": json.dumps(self.scalings)}
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{STATE_FILE}.tmp"
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        """Resume: rebuild the links tied before the checkpoint, the merged weights and the
        current link's rank (the Trainer then loads that link's A, B and optimizer state)."""
        from safetensors import safe_open

        with safe_open(str(directory / STATE_FILE), framework="pt") as f:
            meta = f.metadata()
            n = int(meta["links"])
            self.links = [{name: (f.get_tensor(f"{i}.{name}.A"), f.get_tensor(f"{i}.{name}.B"))
                           for name in self.layers} for i in range(n)]
            self.scalings = json.loads(meta["scalings"])
        if n:
            self._merge()
            self._new_link(self.link_plan.ranks[n])

    def seed(self, directory: Path) -> None:
        """Start from a knot already tied: the PEFT adapter in `directory` (the shared trunk)
        becomes link 0, merged into the weights; the model's current LoRA is the fresh link
        that learns the residual. At export the two are ONE LoRA of their summed rank."""
        from peft import PeftConfig
        from safetensors.torch import load_file

        state, config = load_file(str(directory / "adapter_model.safetensors")), PeftConfig.from_pretrained(str(directory))
        try:
            link = {name: (state[f"{name}.lora_A.weight"].float(), state[f"{name}.lora_B.weight"].float())
                    for name in self.layers}
        except KeyError as e:
            raise ChainloraError(f"{directory}: the trunk has no LoRA factors for {e.args[0]} "
                                 "(trained with other target modules?)")
        scale = peft_scale(config.to_dict(), next(iter(self.layers)))  # alpha / r, or rsLoRA's
        self.links, self.scalings = [link], [scale]
        self._merge()

    # ---------------------------------------------------------------- the end

    def restore_base(self) -> None:
        """Copy W0 back into every merged weight (exact: a copy, not a subtraction)."""
        import torch

        with torch.no_grad():
            for name, w0 in self.w0.items():
                weight = self.layers[name].get_base_layer().weight
                weight.copy_(w0.to(weight.device))
        self.w0 = {}

    def export(self, compress_rank: int | None = None, key: str = "cola.compress_rank") -> dict:
        """Turn the model into W0 + ONE LoRA equal to the sum of the links (or its rank-r SVD);
        return the manifest facts. Saving the PEFT model then writes a plain PEFT adapter."""
        import torch

        links = self.links + [self._current()]
        scalings = self.scalings + [self._scaling()]
        total = sum(next(iter(link.values()))[0].shape[0] for link in links)
        if compress_rank is not None and compress_rank > total:
            raise ChainloraError(f"{key}: {compress_rank} is above the links' total rank {total}")
        rank = compress_rank or total
        self.restore_base()
        peft_cfg = self.model.peft_config[ADAPTER]
        peft_cfg.use_rslora = False  # before _install rebuilds the layers: scaling rank / rank = 1
        errors, dropped, norm = {}, 0.0, 0.0
        for name, layer in self.layers.items():
            a = torch.cat([link[name][0] for link in links], dim=0)
            b = torch.cat([s * link[name][1] for s, link in zip(scalings, links)], dim=1)
            if compress_rank is not None:
                b, a, tail, full = truncate(b, a, rank)
                errors[name] = round(math.sqrt(tail / full), 6) if full > 0 else 0.0
                dropped, norm = dropped + tail, norm + full
            self._install(layer, a, b, rank)
        peft_cfg.r, peft_cfg.lora_alpha = rank, rank  # scaling 1: the s_j are inside B
        peft_cfg.init_lora_weights = True
        info: dict[str, Any] = {"links": len(links), "knots": self.link_plan.knots,
                                "ranks": [next(iter(link.values()))[0].shape[0] for link in links],
                                "export_rank": rank}
        if compress_rank is not None:
            info["compress"] = {"rank": rank, "total_rank": total,
                                "relative_error": round(math.sqrt(dropped / norm), 6) if norm > 0 else 0.0,
                                "module_errors": errors}
        return info

    def _install(self, layer: Any, a: Any, b: Any, rank: int) -> None:
        """Make `layer`'s LoRA the exported one: rank `rank`, lora_alpha = rank (scaling 1: the
        s_j are inside B), A and B the given factors."""
        import torch

        self._rebuild(layer, rank, rank)
        with torch.no_grad():
            layer.lora_A[ADAPTER].weight.copy_(a)
            layer.lora_B[ADAPTER].weight.copy_(b)
