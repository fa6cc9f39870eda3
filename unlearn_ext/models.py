"""The paper's models, sized for small inputs (docs/protocol.md#models): ``make_model(name, input_shape, num_classes)``.

Every builder takes the input shape ``(C, H, W)`` — 1×28×28 (MNIST, Fashion-MNIST, OrganAMNIST),
3×32×32 (CIFAR-10, SVHN), 1×8×8 (digits), any C — and adapts the architecture to it:

* ``mlp``: flatten → Linear(C·H·W, hidden) → ReLU → Linear(hidden, hidden) → ReLU → Linear(hidden, K).
* ``lenet``: LeNet-5 with ReLU and max-pooling; both 5×5 convs padded ("same") so 8×8 inputs fit.
* ``resnet9``: the DAWNBench/Myrtle ResNet-9 (prep 64, 128+pool+residual, 256+pool, 512+pool+residual,
  global max-pool, linear).
* ``vgg11`` / ``vgg19``: torchvision's VGG configurations "A" / "E" with BatchNorm, global average pooling
  and one linear layer (the usual CIFAR VGG head, not the 4096-wide ImageNet head).
* ``resnet18`` / ``resnet50``: torchvision's ResNets with a 3×3 stride-1 stem, no max-pool, and
  ``in_channels`` taken from the input.
* ``alexnet``: torchvision's AlexNet layer widths (64-192-384-256-256, 4096-4096 classifier) with 3×3
  stride-1 convolutions and a 2×2 adaptive pool instead of the 11×11 stride-4 stem and 6×6 pool.
* ``simplevit``: Beyer et al.'s "Better plain ViT baselines" (lucidrains' SimpleViT): 2-D sin-cos position
  embedding, pre-norm encoder, mean pooling, no class token, no dropout.
* ``vit_l``: torchvision's ``VisionTransformer`` in the ViT-Large configuration (24 layers, width 1024,
  16 heads, MLP 4096), patch 4 on 28/32-pixel inputs; ``depth``/``width``/``heads``/``mlp_dim`` override it.

Pooling layers are skipped once the feature map is 1 pixel wide, so every model accepts 8×8 digits.
ViT patch size defaults to 4 when H and W are multiples of 4 and at least 16, else 2 (or 1).

:func:`recommended_lr` gives the paper's learning rate (1e-3 for shallow networks, 5e-4 or 1e-4
for deeper ones, Adam): 1e-3 for ``mlp``/``lenet`` (≤ 5 layers), 5e-4 for the mid-depth CNNs
(``resnet9``, ``alexnet``, ``vgg11``, ``resnet18``), 1e-4 for ``vgg19``, ``resnet50`` and both ViTs
(attention models trained from scratch without warm-up diverge at higher Adam rates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Shape = Tuple[int, int, int]


def _shape(input_shape: Sequence[int]) -> Shape:
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)}")
    return tuple(int(s) for s in input_shape)


def _pool_if_room(h: int, w: int) -> Tuple[nn.Module, int, int]:
    """A 2×2 max-pool and the new map size, or Identity once the map is 1 pixel wide."""
    return (nn.MaxPool2d(2), h // 2, w // 2) if min(h, w) >= 2 else (nn.Identity(), h, w)


def _conv_bn(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# ----------------------------------------------------------------------------------- MNIST family

class MLP(nn.Sequential):
    """Two hidden layers of ``hidden`` units with ReLU."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 512):
        c, h, w = _shape(input_shape)
        super().__init__(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes))


class LeNet(nn.Module):
    """LeNet-5: conv(6, 5×5) → pool → conv(16, 5×5) → pool → 120 → 84 → K, ReLU, "same" padding."""

    def __init__(self, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = _shape(input_shape)
        pool1, h, w = _pool_if_room(h, w)
        pool2, h, w = _pool_if_room(h, w)
        self.features = nn.Sequential(nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(inplace=True), pool1,
                                      nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), pool2)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * h * w, 120), nn.ReLU(inplace=True),
                                        nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class ResNet9(nn.Module):
    """ResNet-9 (Myrtle.ai / DAWNBench) with channel widths ``width``·(1, 2, 4, 8)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, width: int = 64):
        super().__init__()
        c, h, w = _shape(input_shape)
        w1, w2, w3, w4 = width, 2 * width, 4 * width, 8 * width
        pool1, h, w = _pool_if_room(h, w)
        pool2, h, w = _pool_if_room(h, w)
        pool3, h, w = _pool_if_room(h, w)
        self.prep = nn.Sequential(*_conv_bn(c, w1))
        self.layer1 = nn.Sequential(*_conv_bn(w1, w2), pool1)
        self.res1 = nn.Sequential(*_conv_bn(w2, w2), *_conv_bn(w2, w2))
        self.layer2 = nn.Sequential(*_conv_bn(w2, w3), pool2)
        self.layer3 = nn.Sequential(*_conv_bn(w3, w4), pool3)
        self.res3 = nn.Sequential(*_conv_bn(w4, w4), *_conv_bn(w4, w4))
        self.head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w4, num_classes))

    def forward(self, x):
        x = self.layer1(self.prep(x))
        x = x + self.res1(x)
        x = self.layer3(self.layer2(x))
        x = x + self.res3(x)
        return self.head(x)


# ------------------------------------------------------------------------------------- CIFAR / SVHN

class VGG(nn.Module):
    """VGG from a torchvision configuration list (ints = 3×3 conv widths, "M" = 2×2 max-pool)."""

    def __init__(self, cfg: Sequence, input_shape: Sequence[int], num_classes: int):
        super().__init__()
        c, h, w = _shape(input_shape)
        layers: List[nn.Module] = []
        for v in cfg:
            if v == "M":
                pool, h, w = _pool_if_room(h, w)
                layers.append(pool)
            else:
                layers += _conv_bn(c, v)
                c = v
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def vgg11(input_shape, num_classes) -> VGG:
    from torchvision.models.vgg import cfgs
    return VGG(cfgs["A"], input_shape, num_classes)


def vgg19(input_shape, num_classes) -> VGG:
    from torchvision.models.vgg import cfgs
    return VGG(cfgs["E"], input_shape, num_classes)


def _small_input_resnet(factory: Callable, input_shape, num_classes: int) -> nn.Module:
    """A torchvision ResNet with a 3×3 stride-1 stem and no max-pool (the usual CIFAR adaptation)."""
    c, _, _ = _shape(input_shape)
    model = factory(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(c, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    model.maxpool = nn.Identity()
    return model


def resnet18(input_shape, num_classes) -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    return _small_input_resnet(tv_resnet18, input_shape, num_classes)


def resnet50(input_shape, num_classes) -> nn.Module:
    from torchvision.models import resnet50 as tv_resnet50
    return _small_input_resnet(tv_resnet50, input_shape, num_classes)


class AlexNet(nn.Module):
    """AlexNet for small inputs: torchvision's widths, 3×3 stride-1 convolutions, 2×2 adaptive pool."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 4096, dropout: float = 0.5):
        super().__init__()
        c, h, w = _shape(input_shape)
        pool1, h, w = _pool_if_room(h, w)
        pool2, h, w = _pool_if_room(h, w)
        pool3, h, w = _pool_if_room(h, w)
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        self.features = nn.Sequential(
            nn.Conv2d(c, 64, 3, padding=1), relu(), pool1,
            nn.Conv2d(64, 192, 3, padding=1), relu(), pool2,
            nn.Conv2d(192, 384, 3, padding=1), relu(),
            nn.Conv2d(384, 256, 3, padding=1), relu(),
            nn.Conv2d(256, 256, 3, padding=1), relu(), pool3)
        self.avgpool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(256 * 4, hidden), relu(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), relu(), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


# ----------------------------------------------------------------------------------------------- ViTs

def _default_patch(h: int, w: int) -> int:
    for p in (4, 2):
        if h % p == 0 and w % p == 0 and min(h, w) >= 4 * p:
            return p
    return 1


def _sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (h·w, dim); ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"SimpleViT width must be a multiple of 4 for the sin-cos embedding, got {dim}")
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4) / (dim // 4 - 1 if dim > 4 else 1))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class SimpleViT(nn.Module):
    """Plain ViT of Beyer et al. 2022 (patch → LayerNorm → Linear → LayerNorm, + sin-cos position, pre-norm
    encoder with GELU MLP, final LayerNorm, mean over tokens, linear head)."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, patch_size: int = 0, dim: int = 256,
                 depth: int = 6, heads: int = 8, mlp_dim: int = 512):
        super().__init__()
        c, h, w = _shape(input_shape)
        p = patch_size or _default_patch(h, w)
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the input {h}×{w}")
        self.patch_size = p
        self.embed = nn.Sequential(nn.LayerNorm(c * p * p), nn.Linear(c * p * p, dim), nn.LayerNorm(dim))
        self.register_buffer("pos", _sincos_2d(h // p, w // p, dim), persistent=False)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        patches = F.unfold(x, self.patch_size, stride=self.patch_size).transpose(1, 2)  # (B, tokens, C·p·p)
        tokens = self.embed(patches) + self.pos
        return self.head(self.encoder(tokens).mean(dim=1))


def vit_l(input_shape, num_classes, patch_size: int = 0, depth: int = 24, width: int = 1024, heads: int = 16,
          mlp_dim: int = 4096, dropout: float = 0.0) -> nn.Module:
    """torchvision's ViT-Large (``vit_l_16`` sizes) with a small patch and ``in_channels`` from the input."""
    from torchvision.models import VisionTransformer

    c, h, w = _shape(input_shape)
    if h != w:
        raise ValueError(f"vit_l needs square inputs, got {h}×{w}")
    p = patch_size or _default_patch(h, w)
    model = VisionTransformer(image_size=h, patch_size=p, num_layers=depth, num_heads=heads, hidden_dim=width,
                              mlp_dim=mlp_dim, dropout=dropout, num_classes=num_classes)
    if c != 3:
        model.conv_proj = nn.Conv2d(c, width, kernel_size=p, stride=p)
        fan_in = c * p * p  # torchvision's conv_proj initialisation
        nn.init.trunc_normal_(model.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(model.conv_proj.bias)
    return model


# ------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]
    lr: float  # the paper's learning rate for Adam


MODELS: Dict[str, ModelSpec] = {
    "mlp": ModelSpec(MLP, 1e-3),
    "lenet": ModelSpec(LeNet, 1e-3),
    "resnet9": ModelSpec(ResNet9, 5e-4),
    "alexnet": ModelSpec(AlexNet, 5e-4),
    "vgg11": ModelSpec(vgg11, 5e-4),
    "resnet18": ModelSpec(resnet18, 5e-4),
    "vgg19": ModelSpec(vgg19, 1e-4),
    "resnet50": ModelSpec(resnet50, 1e-4),
    "simplevit": ModelSpec(SimpleViT, 1e-4),
    "vit_l": ModelSpec(vit_l, 1e-4),
}

#: The paper's model line-up per data set (docs/protocol.md#models); digits and Fashion-MNIST use the MNIST family.
PAPER_MODELS: Dict[str, Tuple[str, ...]] = {
    "mnist": ("mlp", "lenet", "resnet9"),
    "fashion_mnist": ("mlp", "lenet", "resnet9"),
    "digits": ("mlp", "lenet", "resnet9"),
    "cifar10": ("vgg11", "resnet18", "simplevit"),
    "svhn": ("vgg19", "resnet18", "simplevit"),
    "organamnist": ("alexnet", "resnet50", "vit_l"),
}


def _key(name: str) -> str:
    """Registry key of ``name``, ignoring case, ``-`` and ``_`` ("ResNet-50", "vit-l", "lenet5" ...)."""
    bare = name.lower().replace("-", "").replace("_", "")
    bare = {"vitlarge": "vitl", "lenet5": "lenet"}.get(bare, bare)
    for key in MODELS:
        if key.replace("_", "") == bare:
            return key
    raise ValueError(f"unknown model {name!r}; available: {available_models()}")


def available_models() -> List[str]:
    return sorted(MODELS)


def make_model(name: str, input_shape: Sequence[int], num_classes: int, **kw) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (C, H, W) and ``num_classes`` outputs; ``kw`` goes to
    the builder (e.g. ``hidden=`` for mlp/alexnet, ``width=`` for resnet9, ``depth=``/``width=`` for vit_l)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    return MODELS[_key(name)].build(_shape(input_shape), int(num_classes), **kw)


def recommended_lr(name: str) -> float:
    """The paper's Adam learning rate for model ``name`` (see the module docstring)."""
    return MODELS[_key(name)].lr
