# The main job: an MLP on scikit-learn's bundled handwritten digits (real data, offline).
#   mini-trainer train configs/digits_mlp.py [trainer.max_steps=600 ...]
# Ends with `test_accuracy 0.9xxx` on the held-out 20% split (and `ema_test_accuracy` for
# the EMA weights). Checkpoints go to runs/digits_mlp/checkpoints: kill it and run the same
# command again to continue where it stopped.

trainer = dict(
    type="ClassificationTrainer",
    max_steps=1200,
    grad_clip=1.0,
    seed=0,
    workspace="runs/digits_mlp",
    model_cfg=dict(type="MLP", in_features=64, out_features=10, hidden_sizes=[256, 256], dropout=0.1),
    optimizer_cfg=dict(type="torch.optim.AdamW", lr=2e-3, weight_decay=1e-2),
    lr_scheduler_cfg=dict(type="warmup_cosine", warmup_steps=50),
    data_cfg=dict(type="digits_loaders", batch_size=64, test_fraction=0.2, seed=0),
    hooks=[
        dict(type="ProgressHook", interval=100),
        dict(type="LoggingHook", interval=50),
        dict(type="CheckpointingHook", interval=300, keep_previous=2),
        dict(type="EmaHook", decay=0.99),
    ],
)
