"""What the ViT papers measure inside a model: attention distance, CKA, attention rollout."""
from pretrain.analysis.attention_distance import MeanAttentionDistance, attention_distance, token_layout
from pretrain.analysis.capture import capture_attention, capture_representations, recording
from pretrain.analysis.cka import FullBatchCKA, MinibatchCKA, linear_cka
from pretrain.analysis.rollout import attention_rollout

__all__ = [
    "FullBatchCKA", "MeanAttentionDistance", "MinibatchCKA", "attention_distance", "attention_rollout",
    "capture_attention", "capture_representations", "linear_cka", "recording", "token_layout",
]
