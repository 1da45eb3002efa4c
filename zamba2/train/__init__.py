"""Training and fine-tuning: the loop (loop.py), data (data.py), checkpoints with exact resume (state.py),
LoRA in PEFT's format (lora.py), multi-process wrapping (distributed.py), loss plots (plot.py).

    from zamba2.train import TrainConfig, train
    train(TrainConfig(out="run", data="corpus/", model="path/to/checkpoint", lora_rank=8))
"""

from zamba2.train.data import DataError
from zamba2.train.loop import TrainConfig, Trainer, TrainingStopped, train

__all__ = ["DataError", "TrainConfig", "Trainer", "TrainingStopped", "train"]
