"""The seeds' own APIs on top of mini_trainer, so that code written for them runs after
changing only its import lines.

- `mini_trainer.compat.spiralfastloop`: SpiralFastLoop's `FastTrainer`,
  `dataloader_from_dataset`, `LossStdTrigger` and `LossStdConfig` (its `spiralfastloop`,
  `spiralfastloop.utils` and `spiralfastloop.extras.trigger_mix` in one module), built on
  `BaseTrainer` and `mini_trainer.strategies.surprise_repair`.
"""
