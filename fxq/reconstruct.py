"""Block reconstruction (BRECQ) of weight rounding, one region at a time.

For region k, in order: its inputs come from the model whose earlier regions are already
reconstructed (quantizers active), its target from the float model (quantizers off); the
region's weight quantizers become AdaRound quantizers, trained with Adam on the region's output
MSE plus the annealed rounding regularizer, then hardened. ``--method adaround`` runs the same
loop on single-layer regions (layer-wise AdaRound), ``brecq`` on blocks.

First version: MSE loss, weights only (activation scales stay as calibrated). Fisher weighting,
learned activation step sizes, QDrop and resume come with the rest of the BRECQ issue.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import torch
from torch import fx

from fxq import ops
from fxq.adaround import AdaRoundQuantizer, beta_schedule, rounding_loss
from fxq.quantizers import ActQuantizer, WeightQuantizer
from fxq.region_graph import MemoryBudget, extract_region, record_values


@dataclass(frozen=True)
class ReconConfig:
    iters: int
    batch_size: int
    samples: int
    lr: float = 1e-2
    reg_weight: float = 0.01
    warmup: float = 0.2
    cache_bytes: int = 2 << 30


PRESETS = {
    # sized for 2 CPU cores: a few hundred steps per region
    "fast": ReconConfig(iters=300, batch_size=8, samples=256),
    # the reference setting (BRECQ/QDrop): 20k iterations, batch 32, 1024 samples, Adam lr 1e-3
    "paper": ReconConfig(iters=20000, batch_size=32, samples=1024, lr=1e-3),
}


@contextlib.contextmanager
def quantizers_off(gm: fx.GraphModule):
    """Run ``gm`` as the float model (same graph, every quantizer passing values through)."""
    saved = []
    for mod in gm.modules():
        if isinstance(mod, WeightQuantizer):
            saved.append((mod, "enabled", mod.enabled))
            mod.enabled = False
        elif isinstance(mod, ActQuantizer):
            saved.append((mod, "mode", mod.mode))
            mod.mode = "off"
    try:
        yield gm
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def _adaround_region(gm: fx.GraphModule, layer_names) -> list[AdaRoundQuantizer]:
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name in layer_names:
        wq_node = nodes[name].args[1]
        if wq_node.op != "call_module":
            continue
        mod = gm.get_submodule(wq_node.target)
        if not isinstance(mod, WeightQuantizer):
            continue
        if not isinstance(mod, AdaRoundQuantizer):
            weight = ops.get_attr(gm, wq_node.args[0].target)
            mod = AdaRoundQuantizer(mod, weight)
            ops.set_attr(gm, wq_node.target, mod)
        out.append(mod)
    return out


def _per_sample_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).reshape(out.shape[0], -1).sum(1).mean()


def _minibatch_loss(sub, stores, inputs, output, idx, batched: bool):
    """Mean per-sample output error over cached batches ``idx``: one call on the concatenated
    batches when the region is batch-agnostic (convs, adds), else one call per cached batch
    (regions with shapes baked in by capture). Returns (loss, still_batched)."""
    if batched:
        try:
            out = sub(*[torch.cat([stores[n][i] for i in idx]) for n in inputs])
            return _per_sample_mse(out, torch.cat([stores[output][i] for i in idx])), True
        except RuntimeError:
            pass
    loss = sum(_per_sample_mse(sub(*[stores[n][i] for n in inputs]), stores[output][i]) for i in idx) / len(idx)
    return loss, False


def _region_loss(sub, stores, inputs, output, indices) -> float:
    with torch.no_grad():
        losses = [float(_per_sample_mse(sub(*[stores[n][i] for n in inputs]), stores[output][i])) for i in indices]
    return sum(losses) / max(len(losses), 1)


def reconstruct(gm: fx.GraphModule, calib: torch.Tensor, cfg: ReconConfig, seed: int = 0,
                progress=None) -> list[dict]:
    """Reconstruct every region of ``gm.meta["fxq.regions"]`` in order; returns per-region
    losses (mean per-sample squared error of the region output, before and after)."""
    data = calib[:cfg.samples]
    budget = MemoryBudget(cfg.cache_bytes)
    results = []
    regions = [r for r in gm.meta.get("fxq.regions", []) if r.layers]
    task = progress.add_task("reconstructing", total=len(regions)) if progress else None
    try:
        for region in regions:
            quantizers = _adaround_region(gm, region.layers)
            if not quantizers:
                continue
            sub, inputs = extract_region(gm, region.output, list(region.inputs))
            stores = record_values(gm, data, inputs, budget)
            with quantizers_off(gm):
                stores.update(record_values(gm, data, [region.output], budget))
            n_batches = len(stores[region.output])
            rng = random.Random(seed)
            probe = list(range(min(n_batches, 16)))
            for q in quantizers:
                q.hard = True
            before = _region_loss(sub, stores, inputs, region.output, probe)
            for q in quantizers:
                q.hard = False
            opt = torch.optim.Adam([q.alpha for q in quantizers], lr=cfg.lr)
            torch.manual_seed(seed)
            batched = True
            for step in range(cfg.iters):
                idx = [rng.randrange(n_batches) for _ in range(cfg.batch_size)]
                loss, batched = _minibatch_loss(sub, stores, inputs, region.output, idx, batched)
                loss = loss + rounding_loss(quantizers, beta_schedule(step, cfg.iters, cfg.warmup), cfg.reg_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if progress and step % 25 == 0:
                    progress.update(task, description=f"reconstructing {region.name} (loss {float(loss.detach()):.4g})")
            for q in quantizers:
                q.harden()
            after = _region_loss(sub, stores, inputs, region.output, probe)
            results.append({"region": region.name, "kind": region.kind, "layers": len(quantizers),
                            "loss_before": before, "loss_after": after})
            if progress:
                progress.advance(task)
    finally:
        budget.cleanup()
    return results
