"""featshard.extract.graph: eager / TorchScript / auto choice, checks, fallbacks; the Extractor's features do
not change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from featshard.errors import UsageError
from featshard.extract.extractor import Extractor
from featshard.extract.graph import check_graph, choose_cpu_graph, to_torchscript
from featshard.extract.models import ModelSpec, preprocess_for

PREP = preprocess_for("resnet18", "none")


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def eager() -> Extractor:
    return Extractor(ModelSpec("resnet18", "none", precision="fp32", graph="eager"), PREP, "cpu", compile=False)


def test_unknown_graph_and_jit_below_fp32_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="choose from"):
        check_graph("fast", "fp32")
    with pytest.raises(UsageError, match="fp32 only"):
        check_graph("jit", "bf16")
    check_graph("auto", "bf16")  # auto simply runs eager there


@pytest.mark.parametrize("graph", ["jit", "auto"])
def test_jit_and_auto_give_the_eager_features(eager: Extractor, graph: str) -> None:
    ext = Extractor(ModelSpec("resnet18", "none", precision="fp32", graph=graph), PREP, "cpu", compile=False,
                    batch_size=4)
    assert ext.graph in (("jit",) if graph == "jit" else ("jit", "eager"))
    if graph == "auto":
        assert {"eager_s", "jit_s", "min_cosine"} <= set(ext.graph_info)
    x = pixels(5, seed=1)  # another batch size than the one traced
    np.testing.assert_allclose(ext(x), eager(x), rtol=0, atol=1e-5)
    assert ext(x[:1]).shape == (1, eager.dim)


def test_auto_runs_eager_where_it_does_not_measure(eager: Extractor) -> None:
    ext = Extractor(ModelSpec("resnet18", "none", precision="bf16", graph="auto"), PREP, "cpu", compile=False)
    assert ext.graph == "eager" and ext.graph_info == {}


class _Untraceable(torch.nn.Module):
    """Returns a string in its output: torch.jit.trace refuses it."""

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        return {"feat": x.mean(dim=(2, 3)), "note": "not a tensor"}


def test_auto_falls_back_to_eager_when_tracing_fails() -> None:
    net = _Untraceable()
    chosen, name, info = choose_cpu_graph(net, torch.rand(2, 3, 8, 8), lambda out: out["feat"])
    assert chosen is net and name == "eager" and "jit_s" not in info


def test_auto_keeps_torchscript_only_if_it_is_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """The choice follows the measured times (here made up: TorchScript slower, then faster)."""
    from featshard.extract import graph

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    wrapped = _Dict(net)
    for times, expected in (([0.1, 0.5], "eager"), ([0.5, 0.1], "jit")):  # seconds: eager's, then TorchScript's
        it = iter(times)
        monkeypatch.setattr(graph, "_best_time", lambda fn, runs=2: next(it))
        _, name, info = choose_cpu_graph(wrapped, torch.rand(2, 3, 8, 8), lambda out: out["feat"].flatten(1))
        assert name == expected and info["min_cosine"] > 0.9999


class _Dict(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feat": self.net(x)}


def test_to_torchscript_folds_and_matches() -> None:
    net = _Dict(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval())
    x = torch.rand(3, 3, 16, 16)
    scripted = to_torchscript(net, x)
    with torch.no_grad():
        np.testing.assert_allclose(scripted(x)["feat"].numpy(), net(x)["feat"].numpy(), rtol=0, atol=1e-5)
