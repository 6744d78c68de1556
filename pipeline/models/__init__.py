"""Model registry: names to ready-to-run classifiers with their labels."""

from pipeline.models.registry import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
