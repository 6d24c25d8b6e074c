# Settings of examples/surprise_repair_lm.py: a character-level language model on the text of
# Python's own help topics (pydoc_data.topics), trained twice from the same start: plain, and
# with SurpriseRepairTrainer injecting Surprisal-Sandwich samples the model itself generates.
#   python examples/surprise_repair_lm.py [configs/surprise_repair_lm.py] [steps=100 ...]

seed = 0
steps = 300
batch_size = 64
context = 64  # characters a training sequence predicts
held_out = 0.1  # the last 10% of the text
model = dict(embedding=32, hidden=128)
optimizer = dict(lr=3e-3)
trigger = dict(
    std_threshold=0.5, inject_ratio=0.08, weight_alpha=1.2, budget_frac=0.03, pulse_every=50, max_injected_per_step=8
)
generation = dict(prompt=16, top_p=0.9, temperature=0.8, anti_topk_alpha=10.0, anti_topk_k=5, coherence_mu=0.4)
samples = 2  # generated texts printed at the end, with and without the sandwich
