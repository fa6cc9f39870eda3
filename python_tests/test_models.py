"""The paper's twelve models (docs/protocol.md#models) build for every input shape they are used with and train a step."""
import pytest
import torch

from unlearn_ext import models

SHAPES = {"mnist": (1, 28, 28), "fashion_mnist": (1, 28, 28), "digits": (1, 8, 8), "cifar10": (3, 32, 32),
          "svhn": (3, 32, 32), "organamnist": (1, 28, 28)}
#: Every model on the input shapes of the data sets the paper pairs it with.
CASES = sorted({(name, SHAPES[ds]) for ds, names in models.PAPER_MODELS.items() for name in names})
SMALL_KW = {"vit_l": dict(depth=2, width=64, heads=4, mlp_dim=128), "simplevit": dict(dim=64, depth=2, mlp_dim=128),
            "alexnet": dict(hidden=256)}


def test_every_model_is_in_a_paper_line_up():
    assert {name for name, _ in CASES} == set(models.available_models())


@pytest.mark.parametrize("name,shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_builds_runs_and_trains(name, shape):
    torch.manual_seed(0)
    model = models.make_model(name, shape, 7, **SMALL_KW.get(name, {}))
    x = torch.randn(2, *shape)
    out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_full_size_models_have_their_paper_sizes():
    """Parameter counts of the full configurations, counted on the meta device (no memory)."""
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in models.make_model(n, (3, 32, 32), 10).parameters())
                  for n in ("resnet18", "resnet50", "vgg11", "vgg19", "vit_l", "alexnet")}
    assert 11.0e6 < counts["resnet18"] < 11.3e6
    assert 23.4e6 < counts["resnet50"] < 23.6e6
    assert 9.0e6 < counts["vgg11"] < 9.4e6 and 20.0e6 < counts["vgg19"] < 20.1e6
    assert 300e6 < counts["vit_l"] < 305e6
    assert counts["alexnet"] > 20e6


def test_names_lr_and_bad_arguments():
    assert models.recommended_lr("mlp") == 1e-3 and models.recommended_lr("ResNet-50") == 1e-4
    assert models.make_model("LeNet5", (1, 28, 28), 10).__class__.__name__ == "LeNet"
    with pytest.raises(ValueError, match="unknown model"):
        models.make_model("resnet1000", (3, 32, 32), 10)
    with pytest.raises(ValueError, match="input_shape"):
        models.make_model("mlp", (28, 28), 10)
    with pytest.raises(ValueError, match="num_classes"):
        models.make_model("mlp", (1, 8, 8), 1)
    for ds, names in models.PAPER_MODELS.items():
        assert len(names) == 3 and all(n in models.MODELS for n in names), ds
