"""The one trainer of every task, and the one checkpoint of everything that resumes."""
from pretrain.trainer.checkpointing import Stateful, TrainCheckpoint
from pretrain.trainer.trainer import Trainer

__all__ = ["Stateful", "TrainCheckpoint", "Trainer"]
