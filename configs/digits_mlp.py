# The main job: an MLP on scikit-learn's bundled handwritten digits (real data, offline).
#   mini-trainer train configs/digits_mlp.py [trainer.max_steps=600 ...]
# 15% of the training data is held out as a validation split: it is evaluated every 50
# steps, the checkpoint with the lowest val/loss is kept (runs/digits_mlp/checkpoints/best),
# and training stops early once val/loss has not improved for 5 evaluations. The run then
# ends with `test_accuracy 0.9xxx` of the best weights on the untouched 20% test split (and
# `ema_test_accuracy` for their EMA). Kill it and run the same command again to continue
# where it stopped; `mini-trainer plot runs/digits_mlp` draws its curves.

trainer = dict(
    type="ClassificationTrainer",
    max_steps=1200,
    grad_clip=1.0,
    seed=0,
    workspace="runs/digits_mlp",
    model_cfg=dict(type="MLP", in_features=64, out_features=10, hidden_sizes=[256, 256], dropout=0.1),
    optimizer_cfg=dict(type="torch.optim.AdamW", lr=2e-3, weight_decay=1e-2),
    lr_scheduler_cfg=dict(type="warmup_cosine", warmup_steps=50),
    data_cfg=dict(type="digits_loaders", batch_size=64, test_fraction=0.2, val_fraction=0.15, seed=0),
    hooks=[
        dict(type="ProgressHook", interval=100),
        dict(type="LoggingHook", interval=50),
        dict(type="CheckpointingHook", interval=300, keep_previous=2, keep_best="val/loss"),
        dict(type="EmaHook", decay=0.99),
        dict(type="EvalHook", interval=50, splits=["val"]),
        dict(type="EarlyStoppingHook", monitor="val/loss", patience=5),
    ],
)
