"""Models that timm lacks, registered with timm: after ``import mixrecipe.models``,
``timm.create_model("preact_resnet18", num_classes=10)`` builds them like any timm model.

- ``digits_cnn``: a small CNN for scikit-learn's 8x8 digits (the embedded default recipe).
- ``keras_cnn``: the CNN of the keras.io mixup example on Fashion-MNIST (Glorot init, as Keras does).
- ``preact_resnet18``: PreAct ResNet-18 for 32x32 images, the network of the mixup paper's CIFAR-10 runs.
- ``wide_mlp``: the 2-hidden-layer MLP of the corrupted-label benchmark.

:func:`create_model` is the recipe runner's way in: ``timm.create_model`` for every name, with the
recipe's errors. (``import mixrecipe`` alone imports no timm; the runner imports this module.)
"""

from __future__ import annotations

import difflib

import timm
import torch
from timm.models import register_model
from torch import nn

from .config import ConfigError, RecipeError

__all__ = ["LOCAL_MODELS", "list_local_models", "create_model", "DigitsCNN", "KerasCNN", "PreActResNet18"]

LOCAL_MODELS = ("digits_cnn", "keras_cnn", "preact_resnet18", "wide_mlp")
# What timm.create_model passes to every entry point besides the model's own arguments.
_TIMM_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def list_local_models() -> list[str]:
    """Names of the models defined in mixrecipe (registered with timm)."""
    return sorted(LOCAL_MODELS)


def _model_kwargs(name: str, pretrained: bool, kwargs: dict) -> dict:
    """The arguments of a local model from a timm entry-point call; there are no pretrained weights."""
    if pretrained:
        raise ConfigError(f"model {name} is defined in mixrecipe and has no pretrained weights")
    return {k: v for k, v in kwargs.items() if k not in _TIMM_ARGS}


class DigitsCNN(nn.Module):
    """Three 3x3 conv blocks and a linear head: ~60k parameters, seconds per epoch on a CPU core.

    Args:
        num_classes: output classes.
        in_chans: input channels.
        width: channels of the first block (doubled by the next ones).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_chans, width), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class KerasCNN(nn.Module):
    """The keras.io mixup example's model (18,762 parameters for 10 classes).

    conv5x5(16)-pool-conv5x5(32)-pool-dropout(0.2)-GAP-dense(128)-dense(K); softmax is left to the loss.
    Weights use Glorot-uniform and zero biases, Keras's defaults, so the recipe starts where the example
    starts.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Dropout(0.2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(32, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.features(x))


class _PreActBlock(nn.Module):
    """BN-ReLU-conv twice, identity (or 1x1 conv on the pre-activation) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs (He et al. 2016), laid out as in the mixup paper's CIFAR code:
    a 3x3 stem without pooling, four stages of two blocks (64-128-256-512), global pooling, linear head.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
        stages, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages += [_PreActBlock(cin, cout, stride), _PreActBlock(cout, cout, 1)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.stages(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


@register_model
def digits_cnn(pretrained: bool = False, **kwargs) -> nn.Module:
    return DigitsCNN(**_model_kwargs("digits_cnn", pretrained, kwargs))


@register_model
def keras_cnn(pretrained: bool = False, **kwargs) -> nn.Module:
    return KerasCNN(**_model_kwargs("keras_cnn", pretrained, kwargs))


@register_model
def preact_resnet18(pretrained: bool = False, **kwargs) -> nn.Module:
    return PreActResNet18(**_model_kwargs("preact_resnet18", pretrained, kwargs))


@register_model
def wide_mlp(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, width: int = 1024,
             size: int = 28, **kwargs) -> nn.Module:
    """A 2-hidden-layer MLP without dropout or normalization (784-1024-1024-K, ~1.9M parameters for
    28x28 gray images): enough capacity to memorize thousands of random labels, the model of the
    corrupted-label benchmark (recipes/fashion_mnist_noise.yaml). Inputs of another size are
    average-pooled to ``size`` x ``size`` first (an identity for 28x28).
    """
    extra = _model_kwargs("wide_mlp", pretrained, kwargs)
    if extra:
        raise TypeError(f"wide_mlp got unexpected arguments {sorted(extra)}")
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(size), nn.Flatten(),
        nn.Linear(in_chans * size * size, width), nn.ReLU(inplace=True),
        nn.Linear(width, width), nn.ReLU(inplace=True),
        nn.Linear(width, num_classes),
    )


def create_model(
    name: str, num_classes: int, in_chans: int, pretrained: bool = False, img_size: int | None = None
) -> nn.Module:
    """Build a model by name with ``timm.create_model`` (mixrecipe's models are registered with timm).

    Args:
        name: a name from :func:`list_local_models` or ``timm.list_models()``.
        num_classes: classifier outputs.
        in_chans: input channels.
        pretrained: load timm's pretrained weights (timm models only).
        img_size: input size, passed to timm models that take one (ViTs); ignored by the others.

    Raises:
        RecipeError: unknown name (with the closest names), or pretrained weights asked of a local model.
    """
    if not timm.is_model(name):
        names = timm.list_models()
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"unknown model '{name}' (neither in mixrecipe nor in timm){hint}")
    kwargs = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans)
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # convnets take no img_size
            pass
    return timm.create_model(name, **kwargs)

