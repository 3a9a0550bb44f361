"""How hard is MiniLM's nearest-neighbour agreement target? Three measurements on the float model.

1. **Ties.** For each evaluation sentence, the cosine margin between its nearest and second-nearest
   neighbour in the float embeddings; the share of sentences under 0.005 and 0.01.
2. **Random error.** Every float embedding rotated in a random direction to a given cosine with
   itself; the nearest-neighbour agreement that leaves (mean, min, max over draws). Compare with
   the quantized models' rows in docs/transformers.md at the same mean cosine.
3. **Where 4-bit weights hurt.** Each linear layer alone rounded to 4 bits (per output channel,
   symmetric, clipping searched for squared error), the rest float: 1 − mean cosine of the
   embeddings, per layer, and the same for all layers at once, per channel and with groups of
   32 / 64 / 128 weights per scale. PyTorch fake-quant, no fxq pass involved: a bound on what a
   better weight grid could give, not fxq's result.

    .venv/bin/python benchmarks/minilm_neighbours.py [--eval 400] [--layers-eval 200]

Needs the `transformers` extra (``pip install -e '.[transformers]'``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def neighbour_margins(emb: torch.Tensor) -> torch.Tensor:
    e = F.normalize(emb.float(), dim=-1)
    sim = e @ e.T
    sim.fill_diagonal_(-float("inf"))
    top = sim.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def rotated(emb: torch.Tensor, cosine: float, gen: torch.Generator) -> torch.Tensor:
    """Each row turned by the angle arccos(cosine) towards a random direction orthogonal to it."""
    e = F.normalize(emb.float(), dim=-1)
    d = torch.randn(e.shape, generator=gen)
    d = F.normalize(d - (d * e).sum(1, keepdim=True) * e, dim=-1)
    angle = torch.arccos(torch.tensor(cosine))
    return e * torch.cos(angle) + d * torch.sin(angle)


def round_weight(w: torch.Tensor, bits: int = 4, group: int | None = None) -> torch.Tensor:
    """Symmetric rounding per output channel (or per ``group`` consecutive inputs), the clipping
    factor in [0.5, 1] picked per row for the least squared error."""
    rows = w if group is None else w.reshape(w.shape[0], -1, group)
    qmax = 2 ** (bits - 1) - 1
    amax = rows.abs().amax(-1, keepdim=True).clamp(min=1e-12)
    best, best_err = None, None
    for c in torch.linspace(0.5, 1.0, 26):
        s = amax * c / qmax
        q = (rows / s).round().clamp(-qmax - 1, qmax) * s
        err = (q - rows).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = q, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, q, best), torch.where(better, err, best_err)
    return best.reshape(w.shape)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval", type=int, default=400, help="evaluation sentences for parts 1 and 2")
    ap.add_argument("--layers-eval", type=int, default=200, help="evaluation sentences for part 3")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args(argv)

    from fxq.examples import minilm
    from fxq.examples.text_corpus import stdlib_sentences

    model = minilm.sentence_encoder().eval()
    ids = minilm.tokenize(stdlib_sentences("eval", args.eval, seed=0))
    with torch.no_grad():
        ref = minilm.embed(model, ids)

    margins = neighbour_margins(ref)
    print(f"1. ties ({len(ids)} sentences): margin < 0.005: {float((margins < 0.005).float().mean()):.2%}, "
          f"< 0.01: {float((margins < 0.01).float().mean()):.2%}, median {float(margins.median()):.4f}")

    print(f"2. random rotation to a cosine -> nearest-neighbour agreement ({args.draws} draws)")
    gen = torch.Generator().manual_seed(0)
    for cosine in (0.988, 0.99, 0.995, 0.9975, 0.998, 0.999):
        nn = [minilm.nearest_neighbour_agreement(ref, rotated(ref, cosine, gen)) for _ in range(args.draws)]
        print(f"   {cosine:.4f}: mean {sum(nn) / len(nn):.1%}  min {min(nn):.1%}  max {max(nn):.1%}")

    ids = ids[:args.layers_eval]
    with torch.no_grad():
        ref = model(ids)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]

    def loss_with(weights: dict) -> float:
        saved = {n: m.weight.data for n, m in linears if n in weights}
        try:
            for n, m in linears:
                if n in weights:
                    m.weight.data = weights[n]
            with torch.no_grad():
                return 1.0 - float(F.cosine_similarity(ref, model(ids), dim=-1).mean())
        finally:
            for n, m in linears:
                if n in saved:
                    m.weight.data = saved[n]

    shares = sorted(((loss_with({n: round_weight(m.weight.data)}), n) for n, m in linears), reverse=True)
    total = sum(s for s, _ in shares)
    print(f"3. one linear layer at 4 bits, the rest float ({len(ids)} sentences): "
          f"sum of 1 - cosine {total:.4f} over {len(shares)} layers")
    running = 0.0
    for k, (s, n) in enumerate(shares[:12], 1):
        running += s
        print(f"   {s:.5f} ({s / total:5.1%}, top {k}: {running / total:5.1%})  {n}")
    for group in (None, 128, 64, 32):
        err = loss_with({n: round_weight(m.weight.data, group=group) for n, m in linears})
        label = "per channel" if group is None else f"groups of {group}"
        print(f"   all layers at 4 bits, {label}: mean cosine {1 - err:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
