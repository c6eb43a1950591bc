from __future__ import annotations

import pytest
import torchvision

from featshard.errors import UsageError
from featshard.extract.models import preprocess_for
from featshard.extract.preprocess import Preprocess, from_transforms


def test_recipe_comes_from_the_weights() -> None:
    v1 = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    prep = from_transforms(v1)
    assert (prep.resize, prep.crop, prep.interpolation) == (v1.resize_size[0], v1.crop_size[0], "bilinear")
    assert prep.mean == tuple(v1.mean) and prep.std == tuple(v1.std)
    vit = preprocess_for("vit_b_16")
    assert vit.crop == torchvision.models.ViT_B_16_Weights.DEFAULT.transforms().crop_size[0]


def test_roundtrip_and_vector_fields() -> None:
    prep = preprocess_for("resnet18", decode="exact", timeout=5.0)
    assert Preprocess.from_dict(prep.to_dict()) == prep
    assert "timeout" not in prep.vector_fields() and prep.vector_fields()["decode"] == "exact"


@pytest.mark.parametrize("bad", [{"interpolation": "cubicle"}, {"decode": "magic"}, {"crop": 0}, {"timeout": 0}])
def test_bad_values_are_refused(bad: dict) -> None:
    good = preprocess_for("resnet18").to_dict()
    with pytest.raises(UsageError):
        Preprocess.from_dict({**good, **bad})
