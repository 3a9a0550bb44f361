"""Resumable reconstruction: a checkpoint written after every finished region.

The checkpoint holds what reconstruction changed — each finished AdaRound quantizer's rounding
variables and every activation quantizer's step size — plus the per-region results so far and a
fingerprint of the job (the calibrated model, the calibration data and the reconstruction
settings). ``fxq compile --resume`` restores it and continues with the next region; since every
region seeds its own randomness from (seed, region index), the result equals an uninterrupted
run. The file is written atomically, so an interrupt during a save leaves the previous one.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import fx

from fxq.adaround import AdaRoundQuantizer
from fxq.atomic import atomic_path
from fxq.errors import FxqError
from fxq.quantizers import ActQuantizer

CHECKPOINT_NAME = "reconstruction.ckpt"


def fingerprint(gm: fx.GraphModule, calib: torch.Tensor, settings: str) -> str:
    """A digest of the calibrated graph's tensors, the calibration data and ``settings``."""
    h = hashlib.sha256(settings.encode())
    for name, t in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    h.update(calib.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Checkpoint:
    def __init__(self, directory: str | Path, job: str, resume: bool, console=None):
        self.path = Path(directory) / CHECKPOINT_NAME
        self.job = job
        self.resume = resume
        self.console = console

    def restore(self, gm: fx.GraphModule, regions) -> list[dict]:
        """Apply the saved state of the finished regions to ``gm``; return their results."""
        from fxq.reconstruct import adaround_quantizers

        if not self.resume:
            return []
        if not self.path.exists():
            self._say(f"--resume: no checkpoint at {self.path}; reconstructing from the first region.")
            return []
        try:
            state = torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as exc:  # a damaged file is the user's to delete, not a crash
            raise FxqError(f"The reconstruction checkpoint {self.path} cannot be read ({exc}).",
                           "Delete it and run again without --resume.") from exc
        if state.get("job") != self.job:
            raise FxqError(f"The reconstruction checkpoint in {self.path.parent} belongs to a different "
                           "compile (model, calibration data or reconstruction settings changed).",
                           "Run again with the original arguments, or drop --resume (the checkpoint "
                           "is then overwritten).")
        results = state["results"]
        names = [r.name for r in regions]
        if [r["region"] for r in results] != names[:len(results)]:
            raise FxqError(f"The checkpoint's regions do not match this model's ({self.path}).",
                           "Drop --resume to reconstruct from the start.")
        for region in regions[:len(results)]:
            adaround_quantizers(gm, region.layers)
        modules = dict(gm.named_modules())
        for name, alpha in state["alpha"].items():
            q = modules[name]
            with torch.no_grad():
                q.alpha.copy_(alpha)
            q.harden()
        for name, (scale, zero_point) in state["act"].items():
            with torch.no_grad():
                modules[name].scale.copy_(scale)
                modules[name].zero_point.copy_(zero_point)
        self._say(f"--resume: {len(results)} of {len(regions)} regions restored from {self.path}.")
        return list(results)

    def save(self, gm: fx.GraphModule, regions, results: list[dict]) -> None:
        state = {
            "job": self.job,
            "results": results,
            # host copies: a checkpoint written during a GPU run must load anywhere
            "alpha": {n: m.alpha.detach().cpu().clone() for n, m in gm.named_modules()
                      if isinstance(m, AdaRoundQuantizer) and m.hard},
            "act": {n: (m.scale.detach().cpu().clone(), m.zero_point.detach().cpu().clone())
                    for n, m in gm.named_modules() if isinstance(m, ActQuantizer)},
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)

    def _say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text)
