"""Training helpers: LoRA adapters attached by path pattern, trained in a session; results as Arrow tables."""

from raysight.train.lora import LoRA, TrainResult, train_lora

__all__ = ["LoRA", "TrainResult", "train_lora"]
