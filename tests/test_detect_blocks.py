"""detect_blocks: hand-built edge cases, random DAGs, then torchvision models.

Every case checks the same invariants (``assert_partition``): each layer in exactly one region,
regions disjoint and convex, listed in topological order, stamped on the graph.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from torch import fx, nn

from fxq import ops, passes
from fxq.capture import capture
from fxq.errors import FxqError
from fxq.passes.detect_blocks import ActivationGraph, DetectBlocks, detect_blocks
from fxq.regions import Region, regions_json, regions_table

aten = torch.ops.aten
GRANULARITIES = ("layer", "block", "stage", "net")


def capture_of(model: nn.Module, *shape: int) -> fx.GraphModule:
    torch.manual_seed(0)
    return capture(model, (torch.randn(*shape),))


def assert_partition(gm: fx.GraphModule, regions: list[Region]) -> None:
    nodes = {n.name: n for n in gm.graph.nodes}
    ag = ActivationGraph(gm.graph)
    layers = [n.name for n in gm.graph.nodes if ops.is_layer(n)]
    owners = {name: [r.name for r in regions if name in r.layers] for name in layers}
    assert all(len(o) == 1 for o in owners.values()), {k: v for k, v in owners.items() if len(v) != 1}
    assert len({r.name for r in regions}) == len(regions)
    where = {}
    for i, region in enumerate(regions):
        members = {nodes[n] for n in region.nodes}
        assert region.nodes, region
        assert set(region.layers) <= set(region.nodes)
        assert region.output in region.nodes
        assert list(region.nodes) == [n.name for n in ag.sorted(members)]
        assert ag.between(members) == members, f"{region.name} is not convex"
        outside = {p.name for n in members for p in ag.inputs(n) if p not in members}
        assert set(region.inputs) == outside
        for name in region.nodes:
            assert name not in where, f"{name} in {where.get(name)} and {region.name}"
            where[name] = i
            assert nodes[name].meta["fxq.region"] == region.name
    for name, i in where.items():
        for producer in ag.inputs(nodes[name]):
            assert where.get(producer.name, -1) <= i, f"{regions[i].name} listed before its input"
    unstamped = [n for n in gm.graph.nodes if n.name not in where and "fxq.region" in n.meta]
    assert not unstamped
    assert gm.meta["fxq.regions"] == regions


def blocks(gm: fx.GraphModule, granularity: str = "block") -> list[Region]:
    regions = detect_blocks(gm, granularity)
    assert_partition(gm, regions)
    return regions


def summary(regions: list[Region]) -> list[tuple[str, str, int]]:
    return [(r.name, r.kind, len(r.layers)) for r in regions]


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


# --------------------------------------------------------------------------- hand-built cases

class Basic(nn.Module):
    """x -> conv -> relu -> conv (+ skip) -> relu; the skip is a conv when ``project``."""

    def __init__(self, cin: int = 8, cout: int = 8, project: bool = False, style: str = "plus"):
        super().__init__()
        self.conv1, self.conv2 = conv(cin, cout), conv(cout, cout)
        self.proj = conv(cin, cout, 1) if project else None
        self.style = style

    def forward(self, x):
        skip = self.proj(x) if self.proj is not None else x
        out = self.conv2(torch.relu(self.conv1(x)))
        if self.style == "plus":
            out = out + skip
        elif self.style == "iadd":
            out += skip
        else:  # torch.add with the skip first
            out = torch.add(skip, out)
        return torch.relu(out)


class Net(nn.Module):
    def __init__(self, *body: nn.Module, width: int = 8, features: int = 8):
        super().__init__()
        self.stem = conv(3, width)
        self.body = nn.Sequential(*body)
        self.fc = nn.Linear(features, 5)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("style, op, skip_first", [("plus", aten.add.Tensor, False),
                                                   ("iadd", aten.add_.Tensor, False),
                                                   ("reversed", aten.add.Tensor, True)])
def test_residual_in_any_spelling(style, op, skip_first):
    gm = capture_of(Net(Basic(style=style), Basic(style=style)), 1, 3, 16, 16)
    regions = blocks(gm)
    assert summary(regions) == [("stem", "layer", 1), ("body.0", "residual", 2),
                                ("body.1", "residual", 2), ("fc", "layer", 1)]
    first = regions[1]
    assert first.entry == "relu" and first.inputs == ("relu",)
    exit_ = next(n for n in gm.graph.nodes if n.name == first.output)
    assert exit_.target is op and (exit_.args[0].name == "relu") == skip_first


def test_projection_skip_is_inside_the_block():
    gm = capture_of(Net(Basic(8, 16, project=True), Basic(16, 16), features=16), 1, 3, 16, 16)
    regions = blocks(gm)
    assert summary(regions)[1:3] == [("body.0", "residual", 3), ("body.1", "residual", 2)]
    assert gm.graph.find_nodes(op="placeholder")[0].meta.get("fxq.region") is None


class TwoConvSum(nn.Module):
    """Both operands of the add are layers: neither is an identity."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 8), conv(3, 8, 1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_skip_that_is_itself_a_conv():
    gm = capture_of(TwoConvSum(), 1, 3, 8, 8)
    regions = blocks(gm)
    assert [(r.kind, len(r.layers), r.entry) for r in regions] == [("residual", 2, "x")]


class Nested(nn.Module):
    """y = x + f(x + g(x)): two residual regions, the outer keeping f."""

    def __init__(self):
        super().__init__()
        self.g1, self.g2, self.f1, self.f2 = conv(8, 8), conv(8, 8), conv(8, 8), conv(8, 8)

    def forward(self, x):
        inner = x + self.g2(torch.relu(self.g1(x)))
        return x + self.f2(torch.relu(self.f1(inner)))


class NestedAfterConv(nn.Module):
    """y = x + f(e + g(e)), e = h(x): h feeds the inner block, so it cannot stay in the outer."""

    def __init__(self):
        super().__init__()
        self.h, self.g, self.f = conv(8, 8), conv(8, 8), conv(8, 8)

    def forward(self, x):
        e = torch.relu(self.h(x))
        return x + self.f(e + self.g(e))


def test_nested_residuals():
    gm = capture_of(Nested(), 1, 8, 8, 8)
    regions = blocks(gm)
    assert [(r.kind, r.layers) for r in regions] == [
        ("residual", ("conv2d", "conv2d_1")), ("residual", ("conv2d_2", "conv2d_3"))]
    assert regions[1].inputs == ("x", "add") and regions[1].entry == "x"

    gm = capture_of(NestedAfterConv(), 1, 8, 8, 8)
    assert summary(blocks(gm)) == [("h", "layer", 1), ("g", "residual", 1), ("f", "residual", 1)]


class Inception(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.b1 = conv(cin, 4, 1)
        self.b2 = nn.Sequential(conv(cin, 4, 1), nn.ReLU(), conv(4, 4))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), conv(cin, 4, 1))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b2(x), self.b3(x)], 1)


def test_branches_joined_by_concat():
    gm = capture_of(Net(Inception(8), nn.ReLU(), Inception(12), features=12), 1, 3, 16, 16)
    gm_body = blocks(gm)
    assert summary(gm_body) == [("stem", "layer", 1), ("body.0", "concat", 4),
                                ("body.2", "concat", 4), ("fc", "layer", 1)]


class Dense(nn.Module):
    """Each layer reads the concat of all earlier outputs; the block returns the concat of all."""

    def __init__(self, cin: int = 8, growth: int = 4, n: int = 3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(conv(cin + i * growth, 8, 1), nn.ReLU(), conv(8, growth))
            for i in range(n))

    def forward(self, x):
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


def test_dense_connections_give_one_region_per_layer():
    gm = capture_of(nn.Sequential(Dense(), conv(20, 5, 1)), 1, 8, 8, 8)
    regions = blocks(gm)
    # The first layer reads a one-tensor concat, which joins nothing: it is a plain chain.
    assert summary(regions) == [("0.layers.0", "chain", 2), ("0.layers.1", "concat", 2),
                                ("0.layers.2", "concat", 2), ("1", "layer", 1)]
    assert regions[2].inputs == ("input_1", "conv2d_1", "conv2d_3")
    stage = blocks(gm, "stage")
    # The three layers all output `growth` channels: one stage, closed at the block's concat.
    assert summary(stage) == [("0", "stage", 6), ("1", "stage", 1)]
    assert gm.graph.find_nodes(op="call_function", target=aten.cat.default)[-1].name == stage[0].output


class SharedConv(nn.Module):
    """One conv module called twice: two graph nodes, one weight."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = conv(8, 8), conv(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv(torch.relu(self.conv(x)))))


def test_module_called_twice():
    gm = capture_of(SharedConv(), 1, 8, 8, 8)
    layer_nodes = [n for n in gm.graph.nodes if ops.is_layer(n)]
    assert ops.layer_weight(layer_nodes[0]) is ops.layer_weight(layer_nodes[1])
    regions = blocks(gm)
    # The relu between the two calls belongs to the root, but the chain must hold it to be convex.
    assert summary(regions) == [("conv", "chain", 2), ("head", "layer", 1)]
    assert regions[0].nodes == ("conv2d", "relu", "conv2d_1")
    assert [r.name for r in blocks(gm, "layer")] == ["conv", "conv#2", "head"]


def test_module_called_twice_around_another_layer():
    class Apart(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.mid, self.head = conv(8, 8), conv(8, 8), conv(8, 4, 1)

        def forward(self, x):
            return self.head(self.shared(torch.relu(self.mid(self.shared(x)))))

    gm = capture_of(Apart(), 1, 8, 8, 8)
    # Grouping both calls of `shared` would swallow `mid`: each call stands alone instead.
    assert summary(blocks(gm)) == [("shared", "layer", 1), ("mid", "layer", 1),
                                   ("shared#2", "layer", 1), ("head", "layer", 1)]


def test_block_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block, self.head = conv(3, 8), Basic(), nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.block(self.block(self.stem(x))).mean((2, 3)))

    gm = capture_of(Twice(), 1, 3, 8, 8)
    assert summary(blocks(gm)) == [("stem", "layer", 1), ("block", "residual", 2),
                                   ("block#2", "residual", 2), ("head", "layer", 1)]


def test_no_residual_at_all():
    plain = nn.Sequential(conv(3, 8), nn.ReLU(), conv(8, 8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 4))
    gm = capture_of(plain, 1, 3, 8, 8)
    assert summary(blocks(gm)) == [("0", "layer", 1), ("2", "layer", 1), ("5", "layer", 1)]

    body = Net(conv(8, 8), nn.ReLU(), conv(8, 8))
    gm = capture_of(body, 1, 3, 8, 8)
    assert summary(blocks(gm)) == [("stem", "layer", 1), ("body", "chain", 2), ("fc", "layer", 1)]


def test_graph_without_layers():
    gm = capture_of(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)), 1, 3, 8, 8)
    assert blocks(gm) == [] and blocks(gm, "stage") == []
    assert [(r.kind, r.layers, r.inputs) for r in blocks(gm, "net")] == [("net", (), ("input_1",))]


class TokenMixer(nn.Module):
    """A learned token and position embedding (constants, not joins) before a residual MLP."""

    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, 8))
        self.pos = nn.Parameter(torch.zeros(1, 5, 8))
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.cat([self.token.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x[:, 0])


def test_constant_operands_are_not_joins():
    gm = capture_of(TokenMixer(), 1, 4, 8)
    assert [(r.kind, len(r.layers)) for r in blocks(gm)] == [("residual", 2), ("layer", 1)]


def test_head_stands_alone():
    class TwoLayerHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(conv(3, 8), nn.ReLU(), conv(8, 8))
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x):
            return self.classifier(self.features(x).mean((2, 3)))

    gm = capture_of(TwoLayerHead(), 1, 3, 8, 8)
    assert summary(blocks(gm)) == [("features", "chain", 2), ("classifier.0", "layer", 1),
                                   ("classifier.2", "layer", 1)]


def test_quantizer_modules_are_ordinary_nodes():
    gm = capture_of(Net(Basic(), Basic()), 1, 3, 16, 16)
    for i, layer in enumerate([n for n in gm.graph.nodes if ops.is_layer(n)]):
        gm.add_submodule(f"q{i}", nn.Identity())
        source = layer.args[0]
        with gm.graph.inserting_before(layer):
            q = gm.graph.call_module(f"q{i}", (source,))
        layer.replace_input_with(source, q)
    gm.recompile()
    regions = blocks(gm)
    assert [r.kind for r in regions] == ["layer", "residual", "residual", "layer"]
    assert "q1" in regions[1].nodes and "q2" in regions[1].nodes


def test_granularities_on_a_small_net():
    gm = capture_of(Net(Basic(), Basic(), Basic(8, 16, project=True), features=16), 1, 3, 16, 16)
    assert [r.name for r in blocks(gm, "layer")] == [
        "stem", "body.0.conv1", "body.0.conv2", "body.1.conv1", "body.1.conv2",
        "body.2.proj", "body.2.conv1", "body.2.conv2", "fc"]
    # The stem keeps the shape of the first two blocks; the projection block changes it.
    assert summary(blocks(gm, "stage")) == [("stem..body.1", "stage", 5), ("body.2", "stage", 3),
                                            ("fc", "stage", 1)]
    assert summary(blocks(gm, "net")) == [("net", "net", 9)]
    # The relu between the two blocks was outside both; the stage holds it to stay convex.
    assert "relu_2" in blocks(gm, "stage")[0].nodes


def test_pass_interface_and_rendering():
    gm = capture_of(Net(Basic(), Basic()), 1, 3, 16, 16)
    result = DetectBlocks()(gm)
    assert result.modified is False and result.graph_module is gm
    assert result.stats["counts"] == {"residual": 2, "layer": 2}
    assert passes.detect_blocks(gm) == result.stats["regions"]
    data = regions_json(result.stats["regions"])
    assert data["counts"] == {"residual": 2, "layer": 2}
    assert set(data["regions"][1]) >= {"name", "kind", "nodes", "layers", "inputs", "output"}
    assert Region.from_json(data["regions"][1]) == result.stats["regions"][1]
    console = Console(width=160, record=True)
    console.print(regions_table(result.stats["regions"]))
    text = console.export_text()
    assert "body.0" in text and "residual" in text
    with pytest.raises(FxqError, match="granularity"):
        DetectBlocks("blocks")


# --------------------------------------------------------------------------- random DAGs

MODULES = [(), ("a",), ("a", "a.0"), ("a", "a.1"), ("b",), ("b", "b.0"), ("b", "b.1")]


@st.composite
def random_graphs(draw):
    """Random activation DAGs of layers, activations, adds and concats, with module paths."""
    root, graph = nn.Module(), fx.Graph()
    values = [graph.placeholder("x")]
    for i in range(draw(st.integers(1, 24))):
        def pick():
            # Mostly recent values, so chains and long skips both occur.
            back = draw(st.integers(1, min(len(values), 4) if draw(st.booleans()) else len(values)))
            return values[-back]

        op = draw(st.sampled_from(["layer", "layer", "act", "add", "cat"]))
        if op == "layer":
            root.register_parameter(f"w{i}", nn.Parameter(torch.zeros(1)))
            node = graph.call_function(aten.conv2d.default, (pick(), graph.get_attr(f"w{i}")))
        elif op == "act":
            node = graph.call_function(aten.relu.default, (pick(),))
        elif op == "add":
            node = graph.call_function(draw(st.sampled_from([aten.add.Tensor, aten.add_.Tensor])),
                                       (pick(), pick()))
        else:
            node = graph.call_function(aten.cat.default, ([pick() for _ in range(draw(st.integers(1, 3)))],))
        path = draw(st.sampled_from(MODULES))
        node.meta["nn_module_stack"] = {name: (name, nn.Module) for name in path}
        values.append(node)
    graph.output(values[-1])
    return fx.GraphModule(root, graph)


@settings(max_examples=150, deadline=None)
@given(random_graphs(), st.sampled_from(GRANULARITIES))
def test_random_dags_are_partitioned(gm, granularity):
    regions = blocks(gm, granularity)
    if granularity == "block":
        for region in regions:
            if region.kind in ("residual", "concat"):
                assert any(ops.is_op(n, ops.ADD_OPS | ops.CAT_OPS)
                           for n in gm.graph.nodes if n.name in region.nodes)


# --------------------------------------------------------------------------- torchvision models

@functools.lru_cache(maxsize=None)
def torchvision_graph(name: str) -> fx.GraphModule:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    return capture(model, (torch.randn(1, 3, 224, 224),))


# Block-level counts per kind. Reasoning for the ones the architectures fix:
#   resnet18/50: 8/16 basic/bottleneck blocks; stem conv and fc stand alone.
#   mobilenet_v2: 10 inverted residuals with a skip, 7 without (features.1, 2, 4, 7, 11, 14, 17);
#     stem, last 1x1 conv and classifier alone.
#   mnasnet1_0: stacks of 3,3,3,2,4,1 blocks, the first of each without skip: 10 residual, 6 chains.
#   efficientnet_b0: stages of 1,2,2,3,3,4,1 MBConv blocks, the first of each without skip.
#   mobilenet_v3_large: 10 skips, 5 blocks without (features.2, 4, 7, 11, 13); its two-linear
#     classifier ends in the head, which stands alone, so classifier.0 is a layer region too.
#   regnet_x_400mf: depths 1,2,7,12, every block residual. convnext_tiny: depths 3,3,9,3, plus
#     stem, three downsampling convs and the classifier. vit_b_16: 12 encoder layers with an
#     attention and an MLP residual each; the class token and position embedding are constants.
#   googlenet: 9 inception modules (3a, 3b, 4a-4e, 5a, 5b), each a 4-branch concat.
#   densenet121: 6+12+24+16 dense layers; all but the first of each dense block read a concat of
#     two or more tensors (54 concat regions); the first reads a one-tensor concat (4 chains);
#     conv0, three transition convs and the classifier stand alone.
EXPECTED = {
    "resnet18": ({"residual": 8, "layer": 2}, 21, 6),
    "resnet50": ({"residual": 16, "layer": 2}, 54, 6),
    "mobilenet_v2": ({"residual": 10, "chain": 7, "layer": 3}, 53, 10),
    "mnasnet1_0": ({"residual": 10, "chain": 6, "layer": 5}, 53, 10),
    "efficientnet_b0": ({"residual": 9, "chain": 7, "layer": 3}, 82, 10),
    "mobilenet_v3_large": ({"residual": 10, "chain": 5, "layer": 4}, 64, 9),
    "regnet_x_400mf": ({"residual": 22, "layer": 2}, 72, 6),
    "convnext_tiny": ({"residual": 18, "layer": 5}, 59, 5),
    "vit_b_16": ({"residual": 24, "layer": 2}, 50, 3),
    "googlenet": ({"concat": 9, "layer": 4}, 58, 11),
    "densenet121": ({"concat": 54, "chain": 4, "layer": 5}, 121, 9),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_torchvision_models(name):
    gm = torchvision_graph(name)
    counts, n_layers, n_stages = EXPECTED[name]
    result = DetectBlocks("block")(gm)
    assert result.stats["counts"] == counts
    assert_partition(gm, result.stats["regions"])
    sizes = {}
    for granularity in GRANULARITIES:
        regions = blocks(gm, granularity)
        sizes[granularity] = len(regions)
    assert sizes == {"layer": n_layers, "block": sum(counts.values()), "stage": n_stages, "net": 1}


def test_torchvision_names():
    regions = detect_blocks(torchvision_graph("resnet18"))
    assert [r.name for r in regions] == ["conv1", "layer1.0", "layer1.1", "layer2.0", "layer2.1",
                                         "layer3.0", "layer3.1", "layer4.0", "layer4.1", "fc"]
    assert [r.name for r in detect_blocks(torchvision_graph("resnet18"), "stage")] == [
        "conv1", "layer1", "layer2", "layer3", "layer4", "fc"]
    names = [r.name for r in detect_blocks(torchvision_graph("mobilenet_v2"))]
    assert names[:4] == ["features.0.0", "features.1", "features.2", "features.3"]
    vit = detect_blocks(torchvision_graph("vit_b_16"))
    assert [r.name for r in vit[:3]] == ["conv_proj", "encoder.layers.encoder_layer_0.self_attention",
                                         "encoder.layers.encoder_layer_0.mlp"]
    efficientnet = {r.name: r for r in detect_blocks(torchvision_graph("efficientnet_b0"))}
    # Squeeze-excite (two 1x1 convs and a multiply) stays inside its MBConv block.
    assert efficientnet["features.2.1"].kind == "residual"
    assert len(efficientnet["features.2.1"].layers) == 5
