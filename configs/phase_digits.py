# PhaseTrainer on scikit-learn's digits: most steps use a predicted gradient, no backward.
#   mini-trainer train configs/phase_digits.py [trainer.max_steps=300 trainer.predict_steps=10 ...]
# The MLP and data of examples/phase_digits.py, built from configs. Every step logs
# `phase.backward` (1 on steps that ran a backward pass) and `phase.speedup` (steps per
# backward pass); ends with `test_accuracy 0.9xxx` on the held-out 20% split.

trainer = dict(
    type="PhaseClassificationTrainer",
    max_steps=1000,
    seed=0,
    workspace="runs/phase_digits",
    model_cfg=dict(type="MLP", in_features=64, out_features=10, hidden_sizes=[256, 256]),
    optimizer_cfg=dict(type="torch.optim.Adam", lr=1e-3),
    data_cfg=dict(type="digits_loaders", batch_size=64, test_fraction=0.2, seed=0),
    # PhaseConfig fields (these are its defaults): warmup, then cycles of 5 full steps and
    # 20 predicted ones with a real backward every 5th; the gradient is clipped to 1.0.
    warmup_steps=10,
    full_steps=5,
    predict_steps=20,
    correct_every=5,
    predictor="least_squares",
    history_window=8,
    max_grad_norm=1.0,
    hooks=[
        dict(type="ProgressHook", interval=100),
        dict(type="LoggingHook", interval=50),
        dict(type="CheckpointingHook", interval=250),
    ],
)
