"""rare-cxr: multi-scale ResNet classification of rare chest-radiograph findings (Kedro project)."""

__version__ = "0.1.0"
