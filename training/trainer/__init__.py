"""The training loop: data → adapters → optimizer → steps → eval → export, with checkpoints.

``train(cfg)`` returns a :class:`TrainResult`; the run folder ``cfg.out`` is itself a PEFT
adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and also holds
``report.json``, ``loss_curve.png`` and ``checkpoints/``.
"""

from lorafold.training.trainer.loop import TrainResult, train

__all__ = ["TrainResult", "train"]
