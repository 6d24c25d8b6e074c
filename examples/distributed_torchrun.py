"""Several processes with torchrun: the same script runs on 1 process or N, with DDP or FSDP2.

    python examples/distributed_torchrun.py                                   # one process
    torchrun --nproc_per_node 2 examples/distributed_torchrun.py              # DDP ("auto")
    torchrun --nproc_per_node 2 examples/distributed_torchrun.py --fsdp       # FSDP2

Nothing here is distributed code: the trainer joins the process group torchrun describes,
wraps the model (after `build_model`, before `build_optimizer`: FSDP2 replaces the
parameters), and `digits_loaders` gives each rank its share of every epoch. The batch size
is per rank, so 2 processes with 32 each train with the same global batch as 1 with 64.
Only rank 0 prints. Checkpoints go to the workspace: kill it and run it again to resume,
on the same or a different number of processes.
"""

import sys
import tempfile

from mini_trainer import CheckpointingHook, ClassificationTrainer, ProgressHook, distributed

if __name__ == "__main__":
    workspace = next((a for a in sys.argv[1:] if not a.startswith("--")), None) or tempfile.mkdtemp()
    world = distributed.launched_world()  # known before the process group exists
    trainer = ClassificationTrainer(
        model_cfg=dict(type="MLP", in_features=64, out_features=10, hidden_sizes=[128, 128]),
        optimizer_cfg=dict(type="torch.optim.AdamW", lr=3e-3),  # built after wrapping
        data_cfg=dict(type="digits_loaders", batch_size=64 // world),  # the global batch stays 64
        parallelism="fsdp" if "--fsdp" in sys.argv else "auto",
        max_steps=400,
        grad_clip=1.0,
        seed=0,
        workspace=workspace,
        hooks=[ProgressHook(interval=100, sync=True), CheckpointingHook(interval=200)],
    )
    trainer.train()
    results = trainer.evaluate()  # every rank takes part (FSDP2 gathers weights in forward)
    if distributed.is_main_process():
        print(f"processes {distributed.get_world_size()} parallel {trainer.parallel}")
        print(f"test_accuracy {results['test/accuracy']:.4f}")
