"""The bundled models are timm models: registered with timm, built through one path."""

import pytest
import timm
import torch

from mixrecipe.config import RecipeError
from mixrecipe.models import create_model, list_local_models


@pytest.mark.parametrize("name, in_chans, size", [("digits_cnn", 1, 8), ("keras_cnn", 1, 28),
                                                  ("preact_resnet18", 3, 32), ("wide_mlp", 1, 28)])
def test_bundled_models_come_from_timm_create_model(name, in_chans, size):
    assert name in list_local_models() and timm.is_model(name)
    model = timm.create_model(name, num_classes=7, in_chans=in_chans)
    assert model(torch.rand(2, in_chans, size, size)).shape == (2, 7)
    # The runner's create_model goes through timm too (and drops img_size for models without one).
    ours = create_model(name, num_classes=7, in_chans=in_chans, img_size=size)
    assert type(ours) is type(model)


def test_no_pretrained_weights_for_bundled_models():
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("preact_resnet18", pretrained=True)
    with pytest.raises(RecipeError, match="no pretrained weights"):
        create_model("digits_cnn", 10, 1, pretrained=True)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(RecipeError, match="preact_resnet18"):
        create_model("preact_resnet81", 10, 3)


def test_a_timm_model_still_builds():
    model = create_model("resnet10t", num_classes=3, in_chans=3, img_size=32)
    assert model.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 3)
