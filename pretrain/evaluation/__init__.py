"""Evaluators run by the trainer, one file each, looked up by name: validation, few-shot,
visualize, classification (fine-tuning's test score) and detection mAP."""
from pretrain.evaluation import classification, detection, fewshot, validation, visualize  # noqa: F401  (they register)
from pretrain.evaluation.common import EVALUATORS, Evaluator, build_evaluator, lockstep

__all__ = ["EVALUATORS", "Evaluator", "build_evaluator", "lockstep"]
