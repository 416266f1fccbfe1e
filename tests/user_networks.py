"""A user's own networks, importable as ``user_networks:<factory>`` (tests/ is on sys.path under pytest)."""
from torch import nn


class TinyNetwork(nn.Module):
    """Two convs and a linear head: the smallest network the whole method applies to."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def tiny_network(num_classes: int = 10, width: int = 8) -> nn.Module:
    return TinyNetwork(num_classes, width)


def tiny_network_fixed_head(width: int = 8) -> nn.Module:
    """A factory without ``num_classes``: its head has 10 outputs, whatever the data."""
    return TinyNetwork(10, width)


def not_a_network(num_classes: int = 10):
    return {"num_classes": num_classes}


class PoolOnly(nn.Module):
    """No layer with a weight matrix: nothing to mask."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(x).mean((2, 3))


def pool_only() -> nn.Module:
    return PoolOnly()


def conv_head_network(width: int = 8) -> nn.Module:
    """A factory without ``num_classes`` and without a Linear: a 1x1 convolution gives its 12 outputs."""
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, 12, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
