"""Models by name: one table maps each variant to a family resolver over timm's classes (PerViT is ours).

build_model / export_spec        build a variant; the timm name+kwargs that load its weights
flops_per_image                  forward FLOPs of one image (for MFU)
resize_pos_embed_in_state_dict   carry weights to a new image or patch size
enable_attention_maps            make attention probabilities pass `attn_drop` (analysis hooks)
"""
from pretrain.models.attention_maps import enable_attention_maps
from pretrain.models.flops import flops_per_image
from pretrain.models.posembed import resize_pos_embed_in_state_dict
from pretrain.models.registry import MODELS, ModelSpec, build_model, export_spec

__all__ = [
    "MODELS",
    "ModelSpec",
    "build_model",
    "enable_attention_maps",
    "export_spec",
    "flops_per_image",
    "resize_pos_embed_in_state_dict",
]
