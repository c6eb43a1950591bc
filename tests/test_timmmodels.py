"""featshard.extract.timmmodels (`--model timm:NAME`): names, timm's eval preprocessing, weights (none, a local
safetensors/.pth file, DEFAULT from the local Hugging Face cache, offline error), pre-logits features, --layer,
fingerprint fields. Offline: random init and files the tests save."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from featshard.runner.devices import Device
from featshard.errors import UsageError
from featshard.extract.decode import load_image
from featshard.extract.extractor import Extractor
from featshard.extract.models import ModelSpec, build_model, preprocess_for, weights_identity
from featshard.extract.timmmodels import check_timm_name
from featshard.runner.config import RunConfig
from featshard.runner.prepare import fingerprint_fields, model_spec
from helpers import REPO, photo

VIT, CNN = "timm:vit_tiny_patch16_224", "timm:resnet18"


def test_unknown_names_and_tags_say_the_close_matches() -> None:
    with pytest.raises(UsageError, match=r"unknown timm model 'resnet5O'.*close matches: timm:resnet50"):
        check_timm_name("timm:resnet5O")
    with pytest.raises(UsageError, match=r"no pretrained tag 'nope'.*timm:resnet18\.a1_in1k"):
        check_timm_name("timm:resnet18.nope")
    check_timm_name("timm:vit_small_patch14_dinov2.lvd142m")


@pytest.mark.parametrize("name", ["resnet18.a1_in1k", "vit_tiny_patch16_224", "vit_small_patch14_dinov2.lvd142m",
                                  "convnext_tiny", "eva02_tiny_patch14_224.mim_in22k"])
def test_preprocess_is_timms_eval_transform(name: str, tmp_path: Path) -> None:
    """Sizes, interpolation, mean/std as timm's own eval transform builds them; the pixels of the exact decode
    equal that transform's output on a photo."""
    from timm.data import create_transform, resolve_model_data_config
    from torchvision.transforms import CenterCrop, Resize

    prep = preprocess_for(f"timm:{name}", decode="exact")
    cfg = resolve_model_data_config(timm.create_model(name, pretrained=False, num_classes=0))
    steps = create_transform(**cfg).transforms
    resize = next(t for t in steps if isinstance(t, Resize))
    crop = next(t for t in steps if isinstance(t, CenterCrop))
    assert (prep.resize, prep.crop) == (resize.size, crop.size[0]) and crop.size[0] == crop.size[1]
    assert prep.interpolation == resize.interpolation.value
    assert (prep.mean, prep.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))
    if name == "resnet18.a1_in1k":
        img = photo(1, 500, 375)
        theirs = np.asarray(crop(resize(img)))
        img.save(tmp_path / "photo.png")
        assert np.array_equal(load_image(str(tmp_path / "photo.png"), prep), theirs)


def test_squash_crop_models_are_refused() -> None:
    with pytest.raises(UsageError, match="crop_mode 'squash'"):
        preprocess_for("timm:convnext_tiny.fb_in22k_ft_in1k_384")


@pytest.mark.slow
def test_none_is_seeded_and_files_load_with_or_without_their_head(tmp_path: Path) -> None:
    a, b = build_model(ModelSpec(VIT, "none", seed=0)), build_model(ModelSpec(VIT, "none", seed=0))
    c = build_model(ModelSpec(VIT, "none", seed=1))
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.state_dict()["blocks.0.attn.qkv.weight"], c.state_dict()["blocks.0.attn.qkv.weight"])
    torch.manual_seed(7)
    trained = timm.create_model("vit_tiny_patch16_224", num_classes=10)  # a fine-tuned head: dropped
    torch.save({"state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ckpt.pth")
    save_file({k: v for k, v in trained.state_dict().items() if not k.startswith("head.")},
              tmp_path / "weights.bin")  # safetensors, told by its content, not its name
    for path in (tmp_path / "ckpt.pth", tmp_path / "weights.bin"):
        model = build_model(ModelSpec(VIT, str(path)))
        assert set(model.state_dict()) == {k for k in trained.state_dict() if not k.startswith("head.")}
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match="does not fit timm:resnet18"):
        build_model(ModelSpec(CNN, str(tmp_path / "ckpt.pth")))
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UsageError, match="safetensors"):
        build_model(ModelSpec(VIT, str(tmp_path / "junk.safetensors")))


@pytest.mark.parametrize("name", [VIT, CNN])
def test_features_are_timms_pooled_pre_logits(name: str) -> None:
    prep = preprocess_for(name)
    ext = Extractor(ModelSpec(name, "none", pool="model", graph="auto"), prep, "cpu")
    pixels = np.random.default_rng(0).integers(0, 256, (3, prep.crop, prep.crop, 3), np.uint8)
    model = build_model(ModelSpec(name, "none"))
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - torch.tensor(prep.mean).view(1, 3, 1, 1)) \
        / torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=1)
    got = ext(pixels)
    assert ext.layer == "pre_logits" and ext.graph == "eager" and ext.dim == model.num_features == got.shape[1]
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-5)


def test_layer_picks_an_fx_node_and_pools_it() -> None:
    prep = preprocess_for(VIT)
    ext = Extractor(ModelSpec(VIT, "none", layer="norm.layer_norm", pool="avg"), prep, "cpu")
    assert (ext.layer, ext.dim) == ("norm.layer_norm", 192)
    with pytest.raises(UsageError, match="unknown --layer 'blocks.99'.*pre_logits"):
        Extractor(ModelSpec(VIT, "none", layer="blocks.99"), prep, "cpu")


def _config(**kw: object) -> RunConfig:
    return RunConfig(**{"input": "list.txt", "out": "run", "model": VIT, "weights": "none", "precision": "fp32",
                        **kw})  # type: ignore[arg-type]


def test_pool_applies_only_with_a_layer_and_the_fingerprint_records_timm() -> None:
    spec = model_spec(_config(), [Device("cpu", 0)])
    assert spec.pool == "model"
    with pytest.raises(UsageError, match="--pool max applies with --layer"):
        model_spec(_config(pool="max"), [Device("cpu", 0)])
    assert model_spec(_config(layer="norm.layer_norm", pool="max"), [Device("cpu", 0)]).pool == "max"
    fields = fingerprint_fields(spec, "pre_logits", preprocess_for(VIT), "float32", "sha")
    tag = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    assert fields["timm"] == {"version": timm.__version__, "pretrained_tag": tag}
    assert weights_identity(ModelSpec(CNN, "DEFAULT")) == "timm:resnet18.a1_in1k"


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": "http://127.0.0.1:9", **env})


@pytest.mark.slow
def test_default_weights_offline_fail_at_once_naming_the_tag(tmp_path: Path) -> None:
    proc = _python("from featshard.extract.models import ModelSpec, build_model\n"
                   "build_model(ModelSpec('timm:resnet18', 'DEFAULT'))", {"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode != 0
    assert "FeatshardError: timm's pretrained weights resnet18.a1_in1k are not in the local Hugging Face cache" \
        in proc.stderr and "--weights PATH" in proc.stderr


@pytest.mark.slow
def test_default_weights_load_from_the_local_hugging_face_cache(tmp_path: Path) -> None:
    """DEFAULT = timm's pretrained file for the tag, found in the hub cache without any network."""
    torch.manual_seed(11)
    trained = timm.create_model("resnet18", num_classes=1000)
    snap = tmp_path / "hub" / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("0123abcd")
    save_file(trained.state_dict(), snap / "model.safetensors")
    out = tmp_path / "loaded.pt"
    proc = _python("import sys, torch\nfrom featshard.extract.models import ModelSpec, build_model\n"
                   "torch.save(build_model(ModelSpec('timm:resnet18', 'DEFAULT')).state_dict(), sys.argv[1])\n"
                   .replace("sys.argv[1]", repr(str(out))), {"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(out)
    assert set(loaded) == {k for k in trained.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.items())


@pytest.mark.slow
def test_unknown_timm_model_fails_before_a_worker_starts(tmp_path: Path) -> None:
    from helpers import cli

    (tmp_path / "list.txt").write_text("a.jpg\n")
    proc = cli("run", "--input", str(tmp_path / "list.txt"), "--out", str(tmp_path / "run"), "--model",
               "timm:convnext_tinyy", "--gpus", "cpu")
    assert proc.returncode == 2 and "close matches: timm:convnext_tiny" in proc.stderr
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.slow
def test_timm_run_records_timm_and_its_queries_equal_the_stored_vectors(tmp_path: Path) -> None:
    """`run --model timm:resnet18 --weights FILE` (a fine-tuned checkpoint with 7 classes), then the run's own
    query extractor (what `search` uses) gives back the stored vectors."""
    from featshard.extract.query import QueryExtractor
    from featshard.store.inputs import Item
    from featshard.store.shards import read_attrs
    from helpers import cli, make_images, read_all, write_list

    images = make_images(tmp_path / "imgs", 5)
    torch.manual_seed(5)
    torch.save(timm.create_model("resnet18", num_classes=7).state_dict(), tmp_path / "ft.pth")
    run = tmp_path / "run"
    cli("run", "--input", str(write_list(tmp_path / "list.txt", images)), "--out", str(run), "--model", CNN,
        "--weights", str(tmp_path / "ft.pth"), "--gpus", "cpu", "--batch-size", "2", "--loader-workers", "1",
        "--precision", "fp32", check=True)
    manifest = json.loads((run / "manifest.json").read_text())
    fields = manifest["fingerprint_fields"]
    assert fields["timm"] == {"version": timm.__version__, "pretrained_tag": "resnet18.a1_in1k"}
    assert (fields["layer"], manifest["model"]["pool"], manifest["model"]["dim"]) == ("pre_logits", "model", 512)
    assert manifest["versions"]["timm"] == timm.__version__ and fields["weights"].startswith("sha256:")
    shard = next((run / "shards").glob("shard-*.h5"))
    assert read_attrs(shard)["model"] == CNN
    data = next(iter(read_all(run).values()))
    assert data["rows"].tolist() == list(range(5))
    queries = QueryExtractor(manifest, batch_size=3, workers=0)
    got = [vec for _, vec, _ in queries.features([Item(i, str(p), str(p)) for i, p in enumerate(images)])]
    np.testing.assert_allclose(np.stack(got), data["features"], atol=1e-5)
