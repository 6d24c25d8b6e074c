"""SurpriseRepairTrainer (after SpiralFastLoop): when a batch's per-sample losses are too
uniform, add a few hard or novel samples to it, with a higher weight.

    trainer = SurpriseRepairTrainer(model=m, optimizer=opt, criterion=nn.CrossEntropyLoss(),
                                    trigger=LossStdTrigger(HardestK()), gradient_accumulation_steps=2)
    metrics = trainer.fit(loader, steps=200)

Each micro-step the trigger (`trigger`) reads how uniform the previous micro-step's losses
were and decides how many samples k to inject; a provider (`providers`) returns them, and
the trainer (`trainer`) weights them by `weight_alpha` in the loss; only samples that are
not the batch's own go through the model again.

Modules: `batches` (picking, joining and checking nested batches), `providers` (HardestK,
ReplayBuffer, GeneratorProvider), `trigger` (LossStdConfig, LossStdTrigger), `trainer`
(SurpriseRepairTrainer) and `generation` (Surprisal Sandwich text generation).
"""

from .batches import batch_size as _batch_size  # noqa: F401 - the single-module version's name
from .batches import check_same_structure, concat_samples, select_samples
from .providers import GeneratorProvider, HardestK, ReplayBuffer, _no_observe  # noqa: F401
from .trainer import SurpriseRepairTrainer
from .trigger import LossStdConfig, LossStdTrigger

__all__ = [
    "LossStdConfig",
    "LossStdTrigger",
    "HardestK",
    "ReplayBuffer",
    "GeneratorProvider",
    "SurpriseRepairTrainer",
    "select_samples",
    "concat_samples",
    "check_same_structure",
]

