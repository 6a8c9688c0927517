"""Models by name: one table maps each variant to a timm architecture and its arguments."""
from pretrain.models.registry import MODELS, ModelSpec, build_model, export_spec

__all__ = ["MODELS", "ModelSpec", "build_model", "export_spec"]
