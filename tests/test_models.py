from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from helpers import mobilenet_weights

from featshard.extract import models
from featshard.errors import UsageError
from featshard.extract.models import ModelSpec, build_model, preprocess_for, resolve_precision, weights_identity


def test_local_copy_of_torchvision_weights_gets_their_own_recipe() -> None:
    path = mobilenet_weights()
    v1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    assert preprocess_for("mobilenet_v2", path).resize == v1.resize_size[0] == 256
    assert preprocess_for("mobilenet_v2", "none").resize == 232  # DEFAULT (V2) recipe for random init
    assert weights_identity(ModelSpec("mobilenet_v2", weights=path)).startswith("sha256:b0353104")


def test_fine_tuned_checkpoint_with_other_classes_and_wrappers(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tuned = torchvision.models.resnet18(num_classes=7)
    state = {f"module.{k}": v for k, v in tuned.state_dict().items()}  # saved from DistributedDataParallel
    path = tmp_path / "tuned.pth"
    torch.save({"epoch": 3, "state_dict": state}, path)
    model = build_model(ModelSpec("resnet18", weights=str(path)))
    assert model.fc.out_features == 7
    assert torch.equal(model.layer1[0].conv1.weight, tuned.layer1[0].conv1.weight)
    full = tmp_path / "full.pt"
    torch.save(tuned, full)
    assert torch.equal(build_model(ModelSpec("resnet18", weights=str(full))).fc.weight, tuned.fc.weight)


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(UsageError, match="does not fit resnet18"):
        build_model(ModelSpec("resnet18", weights=str(path)))


def test_random_init_is_identical_for_the_same_seed() -> None:
    a = build_model(ModelSpec("resnet18", weights="none", seed=3))
    b = build_model(ModelSpec("resnet18", weights="none", seed=3))
    c = build_model(ModelSpec("resnet18", weights="none", seed=4))
    assert torch.equal(a.conv1.weight, b.conv1.weight) and not torch.equal(a.conv1.weight, c.conv1.weight)


def test_precision_resolution(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    caplog.set_level("INFO", logger="featshard.extract.models")
    assert resolve_precision("auto", "cuda", [(9, 0), (8, 0)]) == "bf16"  # H100 + A100: every device has bf16
    assert resolve_precision("auto", "cuda", [(9, 0), (7, 5)]) == "fp16"  # one T4 among them: all use fp16
    assert resolve_precision("auto", "cuda", []) == "fp16"  # unknown: the precision every GPU has
    assert "--precision auto: fp16 (compute capability 7.5, 9.0 of 2 selected GPU(s)" in caplog.text
    assert resolve_precision("fp32", "cuda", [(7, 0)]) == "fp32"
    with pytest.raises(UsageError):
        resolve_precision("fp16", "cpu")
    with pytest.raises(UsageError):
        resolve_precision("int4", "cpu")
