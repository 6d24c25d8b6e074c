# SPELA (learning with a single forward pass) on scikit-learn's digits:
#   mini-trainer train configs/digits_spela.py
# Ends with `test_accuracy 0.9xxx` (the last layer) after `test_exit_1_accuracy ...`, one per
# exit layer. The output layer is wider than the 10 classes on purpose, as in the paper.

trainer = dict(
    type="SpelaTrainer",
    model=dict(type="MLP", in_features=64, out_features=34, hidden_sizes=[512, 256], activation="relu"),
    num_classes=10,
    lr=5e-2,
    momentum=0.9,
    max_epochs=30,
    seed=0,
    workspace="runs/digits_spela",
    data_loader=dict(type="digits_loaders", batch_size=32, seed=0),
    hooks=[
        dict(type="ProgressHook", interval=300),
        dict(type="LoggingHook", interval=100),
        dict(type="CheckpointingHook", interval=1000),
    ],
)
