"""Models by name: one table maps each variant to a family resolver over timm's classes (PerViT is ours)."""
from pretrain.models.registry import MODELS, ModelSpec, build_model, export_spec, zero_init_head

__all__ = ["MODELS", "ModelSpec", "build_model", "export_spec", "zero_init_head"]
