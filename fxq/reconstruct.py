"""Block reconstruction (BRECQ, with the QDrop option), one region at a time.

For region k, in order: its inputs come from the model whose earlier regions are already
reconstructed (quantizers active), its target from the float model (quantizers off). The
region's weight quantizers become AdaRound quantizers and its activation quantizers get a
learnable step size (LSQ); both are trained with Adam on the region's output error — plain
squared error or Fisher-weighted (``fxq.fisher``) — plus the annealed rounding regularizer, then
frozen. ``--method adaround`` runs the same loop on single-layer regions, ``brecq`` on blocks,
``qdrop`` on blocks with activation quantization randomly dropped while training.

Tuning is ``joint`` (rounding and step sizes together, QDrop's recipe) or ``two-stage`` (BRECQ's
original order: rounding with the region's activation quantizers off, then step sizes with the
rounding frozen). Every region draws its randomness from ``(seed, region index)``, so a run
resumed from a checkpoint after region k equals an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, replace

import torch
from torch import fx

from fxq import ops
from fxq.adaround import AdaRoundQuantizer, beta_schedule, rounding_loss
from fxq.quantizers import ActQuantizer, WeightQuantizer
from fxq.region_graph import MemoryBudget, extract_region, record_values

TUNINGS = ("joint", "two-stage")


@dataclass(frozen=True)
class ReconConfig:
    iters: int
    batch_size: int
    samples: int
    lr: float = 3e-2            # AdaRound alpha
    act_lr: float = 5e-3        # LSQ step sizes: Adam rate as a fraction of each initial step, cosine-annealed
    reg_weight: float = 0.01
    warmup: float = 0.2
    cache_bytes: int = 2 << 30
    loss: str = "mse"           # or "fisher"
    drop_prob: float = 0.0      # QDrop: chance an activation element stays float while training
    tuning: str = "joint"
    learn_act: bool = True
    relevance: bool = True      # fit only the output elements that reach the model's output (fxq.relevance)


PRESETS = {
    # sized for 2 CPU cores: Lite0 W4A8 compiles in under 10 minutes. With so few steps the
    # rounding variables need a larger rate than the reference's 1e-3: on the digits MobileNetV2
    # at W2A4, 1e-2 / 3e-2 / 1e-1 gave 96.7 / 98.5 / 99.0 % accuracy (float 99.2 %), while on
    # Lite0 W4A8 1e-1 lost top-1 agreement against 1e-2 (57 % vs 66 %, 300 crops): 3e-2 between
    "fast": ReconConfig(iters=250, batch_size=8, samples=256, lr=3e-2),
    # the reference setting (BRECQ/QDrop): 20k iterations, batch 32, 1024 samples, Adam lr 1e-3
    # for the rounding and 4e-5 for the step sizes (absolute there; 2e-3 of a typical 8-bit step)
    "paper": ReconConfig(iters=20000, batch_size=32, samples=1024, lr=1e-3, act_lr=2e-3),
}


def config_for(preset: str, method: str, loss: str = "mse", iters: int | None = None,
               drop_prob: float = 0.5, tuning: str = "joint") -> ReconConfig:
    cfg = replace(PRESETS[preset], loss=loss, tuning=tuning,
                  drop_prob=drop_prob if method == "qdrop" else 0.0)
    return replace(cfg, iters=iters) if iters is not None else cfg


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


@contextlib.contextmanager
def _frozen_parameters(gm: fx.GraphModule):
    """Only rounding variables and step sizes train; no gradient is spent on weights or biases."""
    params = [p for p in gm.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def adaround_quantizers(gm: fx.GraphModule, layer_names) -> list[AdaRoundQuantizer]:
    """The weight quantizers of ``layer_names``, swapped for AdaRound quantizers in place."""
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


def _act_quantizers(sub: fx.GraphModule) -> list[ActQuantizer]:
    seen, out = set(), []
    for node in sub.graph.nodes:
        if node.op == "call_module":
            mod = sub.get_submodule(node.target)
            if isinstance(mod, ActQuantizer) and mod.mode == "quantize" and id(mod) not in seen:
                seen.add(id(mod))
                out.append(mod)
    return out


def _weighted_error(out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean over samples of the (Fisher-weighted) squared error summed over the sample."""
    err = (out - target).pow(2)
    if weight is not None:
        err = err * weight
    return err.reshape(out.shape[0], -1).sum(1).mean()


class _RegionData:
    """The cached tensors one region trains on, gathered into minibatches."""

    def __init__(self, q_inputs, f_inputs, target, weight, names):
        self.q_inputs, self.f_inputs, self.target, self.weight = q_inputs, f_inputs, target, weight
        self.names = names
        self.n = len(target)
        self.device = target[0].device if self.n else torch.device("cpu")

    def inputs(self, idx, drop_prob: float, gen: torch.Generator | None):
        xs = []
        for name in self.names:
            q = [self.q_inputs[name][i] for i in idx]
            if drop_prob > 0.0 and name in self.f_inputs:
                # QDrop on the region's input: each element comes from the float model with prob p
                f = [self.f_inputs[name][i] for i in idx]
                q = [torch.where(torch.rand(a.shape, generator=gen, device=a.device) < drop_prob, b, a)
                     for a, b in zip(q, f)]
            xs.append(q)
        return xs

    def loss(self, sub, idx, batched: bool, drop_prob: float = 0.0, gen=None):
        """Mean per-sample error over cached batches ``idx``: one call on the concatenated
        batches when the region is batch-agnostic (convs, adds), else one call per cached batch
        (regions with shapes baked in by capture). Returns (loss, still_batched)."""
        xs = self.inputs(idx, drop_prob, gen)
        weights = [self.weight[i] for i in idx] if self.weight is not None else None
        if batched:
            try:
                out = sub(*[torch.cat(x) for x in xs])
                tgt = torch.cat([self.target[i] for i in idx])
                w = torch.cat(weights) if weights is not None else None
                return _weighted_error(out, tgt, w), True
            except RuntimeError:
                pass
        total = 0.0
        for j, i in enumerate(idx):
            out = sub(*[x[j] for x in xs])
            total = total + _weighted_error(out, self.target[i], weights[j] if weights else None)
        return total / len(idx), False

    @torch.no_grad()
    def mean_error(self, sub, indices) -> float:
        """The training loss (weights included) of cached batches ``indices``, no rounding term."""
        losses = []
        for i in indices:
            out = sub(*[self.q_inputs[n][i] for n in self.names])
            w = self.weight[i] if self.weight is not None else None
            losses.append(float(_weighted_error(out, self.target[i], w)))
        return sum(losses) / max(len(losses), 1)


def _train(params_groups, steps: int, loss_fn, progress=None, task=None, label="", offset: int = 0) -> float:
    opt = torch.optim.Adam(params_groups)
    # the step sizes' rate is cosine-annealed (as in the reference); the rounding variables keep
    # a constant rate, the annealed regularizer is what settles them
    anneal = [g.get("anneal", False) for g in params_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [
        (lambda i: 0.5 * (1.0 + math.cos(math.pi * min(i, steps) / max(steps, 1)))) if a else (lambda i: 1.0)
        for a in anneal])
    last = math.nan
    for step in range(steps):
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # reading the loss waits for the device: only as often as the progress bar shows it
        if step % 10 == 0 or step == steps - 1:
            last = float(loss.detach())
            if progress is not None:
                progress.update(task, completed=offset + step + 1, description=f"{label} loss {last:.4g}")
    return last


def _step_groups(acts, rate: float) -> list[dict]:
    """One Adam group per step size, its rate a fraction of the initial step: Adam moves a
    parameter by about its rate per step whatever the gradient's size, and steps range over
    orders of magnitude between tensors."""
    return [{"params": [p], "lr": rate * float(p.detach()), "anneal": True}
            for p in (a.start_learning() for a in acts)]


def _train_region(sub, data: _RegionData, quantizers, acts, cfg: ReconConfig, seed: int,
                  progress=None, label="") -> None:
    rng = random.Random(seed)
    gen = torch.Generator(device=data.device).manual_seed(seed)
    torch.manual_seed(seed)  # QDrop's masks inside the region's activation quantizers (CUDA too)
    batched = [True]
    # a cached batch holds the graph's static batch of samples: a step sees cfg.batch_size samples
    first = data.target[0] if data.n else None
    per_batch = int(first.shape[0]) if first is not None and first.dim() > 0 else 1
    picks = max(1, -(-cfg.batch_size // per_batch))

    def pick():
        return [rng.randrange(data.n) for _ in range(picks)]

    def stage(steps, with_rounding: bool, drop: float):
        def loss_fn(step):
            idx = pick()
            loss, batched[0] = data.loss(sub, idx, batched[0], drop, gen)
            if with_rounding:
                beta = beta_schedule(step, steps, cfg.warmup)
                loss = loss + rounding_loss(quantizers, beta, cfg.reg_weight)
            return loss
        return loss_fn

    task = progress.add_task(label, total=cfg.iters * (2 if cfg.tuning == "two-stage" and acts else 1)) if progress else None
    learn_acts = cfg.learn_act and bool(acts)
    try:
        if cfg.tuning == "two-stage":
            # stage 1: rounding against the float activations of the region
            saved = [(a, a.mode) for a in acts]
            for a in acts:
                a.mode = "off"
            try:
                _train([{"params": [q.alpha for q in quantizers], "lr": cfg.lr}], cfg.iters,
                       stage(cfg.iters, True, 0.0), progress, task, label)
            finally:
                for a, mode in saved:
                    a.mode = mode
            for q in quantizers:
                q.harden()
            if learn_acts:
                for a in acts:
                    a.drop_prob = cfg.drop_prob
                _train(_step_groups(acts, cfg.act_lr), cfg.iters,
                       stage(cfg.iters, False, cfg.drop_prob), progress, task, label, offset=cfg.iters)
        else:
            groups = [{"params": [q.alpha for q in quantizers], "lr": cfg.lr}]
            if learn_acts:
                groups += _step_groups(acts, cfg.act_lr)
            for a in acts:
                a.drop_prob = cfg.drop_prob
            _train(groups, cfg.iters, stage(cfg.iters, True, cfg.drop_prob), progress, task, label)
    finally:
        for q in quantizers:
            q.harden()
        for a in acts:
            a.stop_learning()
        if progress is not None:
            progress.remove_task(task)


def reconstruct(gm: fx.GraphModule, calib: torch.Tensor, cfg: ReconConfig, seed: int = 0,
                progress=None, checkpoint=None, device: str | torch.device = "cpu") -> list[dict]:
    """Reconstruct every region of ``gm.meta["fxq.regions"]`` in order; returns per-region
    losses (the trained loss -- squared error of the region output, over the elements that
    reach the model's output, Fisher-weighted for ``cfg.loss == "fisher"`` -- on up to 16 cached
    batches, before and after) and wall times. ``checkpoint`` (a ``fxq.resume.Checkpoint``) restores
    finished regions and records each region as it finishes. On a CUDA ``device`` the model,
    the cached values and the training run there; ``gm`` is back on the CPU on return."""
    from fxq.devices import cache_cap, on_device
    from fxq.frontier import Frontier

    device = torch.device(device)
    data = calib[:cfg.samples].to(device)
    budget = MemoryBudget(cache_cap(device, cfg.cache_bytes), device=device)
    frontier = None
    results = []
    regions = [r for r in gm.meta.get("fxq.regions", []) if r.layers]
    try:
        with on_device(gm, device), _frozen_parameters(gm):
            targets, f_inputs, weights = _float_side(gm, data, regions, cfg, budget, progress, seed)
            done = checkpoint.restore(gm, regions) if checkpoint is not None else []
            frontier = Frontier(gm, data, budget)
            results.extend(done)
            overall = progress.add_task("reconstructing regions", total=len(regions),
                                        completed=len(done)) if progress else None
            for k, region in enumerate(regions):
                if k < len(done):
                    continue
                results.append(_reconstruct_region(gm, region, k, frontier, targets, f_inputs, weights,
                                                   cfg, seed, progress))
                if checkpoint is not None:
                    checkpoint.save(gm, regions, results)
                if progress:
                    progress.advance(overall)
    finally:
        if frontier is not None:
            frontier.release()
        budget.cleanup()
    return results


class _MaskedWeights:
    """Loss weights on the elements that reach the output (``fxq.relevance``), divided by their
    share so the mean weight over all elements stays 1: the loss keeps the scale the rounding
    regularizer's weight was tuned for."""

    def __init__(self, masks, fraction: float, inner=None):
        self.masks, self.fraction, self.inner = masks, fraction, inner

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, i: int) -> torch.Tensor:
        w = self.masks[i].to(torch.float32) / self.fraction
        return w if self.inner is None else w * self.inner[i]


class _RegionWeights:
    """The loss weights of each region's output: Fisher (``--loss fisher``) and/or relevance
    masks, or None for plain squared error."""

    def __init__(self, fisher=None, masks=None):
        self.fisher, self.masks = fisher, masks

    def fraction(self, name: str) -> float:
        return self.masks.fractions[name] if self.masks is not None and name in self.masks else 1.0

    def region(self, name: str):
        fraction = self.fraction(name)
        inner = self.fisher.region(name, fraction) if self.fisher is not None else None
        if fraction < 1.0:
            return _MaskedWeights(self.masks.region(name), fraction, inner)
        return inner


def _float_side(gm, data, regions, cfg, budget, progress, seed=0):
    """Everything the float model contributes, in one streaming pass: every region's target,
    the float inputs QDrop mixes in; then the loss weights: Fisher (``--loss fisher``) and the
    relevance masks (either loss)."""
    outputs = sorted({r.output for r in regions})
    inputs = sorted({n for r in regions for n in r.inputs}) if cfg.drop_prob > 0 else []
    # the Fisher pass compares against the float predictions: record them in the same pass
    logits = [n.args[0].name for n in gm.graph.nodes if n.op == "output"] if cfg.loss == "fisher" else []
    names = sorted(set(outputs) | set(inputs) | set(logits))
    with quantizers_off(gm):
        stores = record_values(gm, data, names, budget) if names else {}
    fisher = None
    if cfg.loss == "fisher":
        from fxq.fisher import fisher_weights

        task = progress.add_task("Fisher weights", total=None) if progress else None
        fisher = fisher_weights(gm, data, outputs, budget, reference=stores[logits[0]])
        if progress:
            progress.remove_task(task)
    masks = None
    if cfg.relevance and outputs:
        from fxq.relevance import relevance_masks

        task = progress.add_task("finding the outputs that matter", total=None) if progress else None
        masks = relevance_masks(gm, data, outputs, budget, seed)
        if progress:
            progress.remove_task(task)
    return ({n: stores[n] for n in outputs}, {n: stores[n] for n in inputs}, _RegionWeights(fisher, masks))


def _reconstruct_region(gm, region, k, frontier, targets, f_inputs, weights, cfg, seed, progress) -> dict:
    start = time.perf_counter()
    quantizers = adaround_quantizers(gm, region.layers)
    sub, names = extract_region(gm, region.output, list(region.inputs))
    acts = _act_quantizers(sub)
    q_inputs = frontier.get(names)
    weight = weights.region(region.output)
    rd = _RegionData(q_inputs, {n: f_inputs[n] for n in names if n in f_inputs}, targets[region.output],
                     weight, names)
    probe = list(range(min(rd.n, 16)))
    for q in quantizers:
        q.hard = True
    before = rd.mean_error(sub, probe)
    for q in quantizers:
        q.hard = False
    trained = time.perf_counter()
    if quantizers or (cfg.learn_act and acts):
        _train_region(sub, rd, quantizers, acts, cfg, seed * 1000003 + k, progress,
                      label=f"{region.name} ({len(quantizers)} layers)")
    trained = time.perf_counter() - trained  # _train reads the last loss: the device is done
    after = rd.mean_error(sub, probe)
    frontier.forget({n.target for n in sub.graph.nodes if n.op == "call_module"})
    return {"region": region.name, "kind": region.kind, "layers": len(quantizers),
            "activation_quantizers": len(acts), "loss_before": before, "loss_after": after,
            "relevant_fraction": round(weights.fraction(region.output), 4),
            "seconds": round(time.perf_counter() - start, 3), "train_seconds": round(trained, 3)}
