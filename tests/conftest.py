import pytest
import torch

from ppsearch.models import PPFlowConfig, PPFlowDiT

pytest_plugins = ["postgres"]  # tests/postgres.py: a PostgreSQL server and database fixtures


def randomized(model, std=0.05, seed=0):
    """Every parameter random and non-zero, so that no path hides behind adaLN-Zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * std)
    return model


def tiny_config(**kwargs):
    defaults = dict(input_size=(16, 16), in_channels=3, hidden_size=48, depth=2, num_heads=4, num_classes=10)
    return PPFlowConfig(**{**defaults, **kwargs})


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return randomized(PPFlowDiT(tiny_config())).eval()
