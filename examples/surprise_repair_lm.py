"""Surprise -> Repair on a character-level language model, closing the loop: the model's own
Surprisal-Sandwich generations are injected as training data when its losses get uniform.

    python examples/surprise_repair_lm.py [CONFIG] [key=value ...]     (CONFIG: configs/surprise_repair_lm.py)

Text: `pydoc_data.topics` (Python's help texts, shipped with Python). The last 10% is held
out. Both runs start from the same weights and see the same batches; the second is a
`SurpriseRepairTrainer` whose `GeneratorProvider` writes k new sequences: a 16-character
prompt from the batch, continued by the current model with AntiTopK in the middle and a
character-bigram model's CoherenceBoost in the tail. Printed: held-out loss of both runs
(nats per character), the trigger's counters, and a few samples with and without the
sandwich.
"""

import sys
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from torch import nn

from mini_trainer import BaseTrainer
from mini_trainer.config import load_config
from mini_trainer.data import tensor_loader
from mini_trainer.strategies import GeneratorProvider, LossStdConfig, LossStdTrigger, SurpriseRepairTrainer
from mini_trainer.strategies.surprise_repair.generation import AntiTopK, CoherenceBoost, surprisal_sandwich_generate


class CharGRU(nn.Module):
    def __init__(self, vocab: int, embedding: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.gru = nn.GRU(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> logits (B, T, V)
        return self.head(self.gru(self.embed(ids))[0])


class Bigram(nn.Module):
    """The small model of the coherence tail: character bigram log-probabilities."""

    def __init__(self, ids: torch.Tensor, vocab: int) -> None:
        super().__init__()
        counts = torch.ones(vocab, vocab).index_put_((ids[:-1], ids[1:]), torch.ones(len(ids) - 1), accumulate=True)
        self.register_buffer("table", counts.log() - counts.sum(1, keepdim=True).log())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def main() -> None:
    args = sys.argv[1:]
    path = args.pop(0) if args and "=" not in args[0] else "configs/surprise_repair_lm.py"
    cfg = load_config(path, args)
    torch.manual_seed(cfg["seed"])
    text = "\n".join(topics[k] for k in sorted(topics))
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text])
    split = int(len(ids) * (1 - cfg["held_out"]))
    train_ids, test_ids = ids[:split], ids[split:]
    n = cfg["context"]

    def windows(seq: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.arange(0, len(seq) - n - 1, stride)
        rows = torch.stack([seq[s : s + n + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    x, y = windows(train_ids, n // 2)
    test_x, test_y = windows(test_ids, n)
    bigram = Bigram(train_ids, len(chars))
    start_model = CharGRU(len(chars), **cfg["model"])
    gen_cfg = cfg["generation"]

    def held_out_loss(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(
                F.cross_entropy(model(bx).transpose(1, 2), by).item()
                for bx, by in zip(test_x.split(256), test_y.split(256), strict=True)
            ) / len(test_x.split(256))

    def sandwich(model: nn.Module, prompt: torch.Tensor, with_sandwich: bool = True, seed: int = 0) -> torch.Tensor:
        new = n + 1 - prompt.shape[1]
        was_training = model.training
        model.eval()
        try:
            return surprisal_sandwich_generate(
                model, prompt, max_new_tokens=new, top_p=gen_cfg["top_p"], temperature=gen_cfg["temperature"],
                anti_topk=AntiTopK(alpha=gen_cfg["anti_topk_alpha"], k=gen_cfg["anti_topk_k"]),
                coherence=CoherenceBoost(bigram, mu=gen_cfg["coherence_mu"]), sandwich=with_sandwich,
                generator=torch.Generator().manual_seed(seed),
            )
        finally:
            model.train(was_training)

    def run(repair: bool) -> tuple[float, nn.Module, dict]:
        model = CharGRU(len(chars), **cfg["model"])
        model.load_state_dict(start_model.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), **cfg["optimizer"])
        loader = tensor_loader(x, y, batch_size=cfg["batch_size"], seed=cfg["seed"])
        criterion = nn.CrossEntropyLoss(reduction="none")  # one loss per character
        # Both arms train the same model from the same start on the same data.
        common = dict(model=model, optimizer=optimizer, data_loader=loader, device="cpu", seed=cfg["seed"],
                      grad_clip=1.0)
        if not repair:
            trainer = BaseTrainer(**common, forward_fn=lambda m, b: F.cross_entropy(m(b[0]).transpose(1, 2), b[1]))
            trainer.fit(steps=cfg["steps"])
            return held_out_loss(model), model, {}
        calls = iter(range(10**9))

        def generate(k: int, batch):  # k new (input, target) sequences shaped like the batch
            rows = sandwich(model, batch[0][:k, : gen_cfg["prompt"]], seed=next(calls))
            return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

        trigger = LossStdTrigger(GeneratorProvider(generate), LossStdConfig(**cfg["trigger"]))
        trainer = SurpriseRepairTrainer(
            **common, criterion=lambda logits, targets: criterion(logits.transpose(1, 2), targets), trigger=trigger
        )
        trainer.fit(steps=cfg["steps"])
        return held_out_loss(model), model, {"fired": trigger.fired, "injected": trigger.injected, "seen": trigger.seen}

    base_loss, _, _ = run(repair=False)
    repair_loss, model, counters = run(repair=True)
    print(f"held_out_loss baseline {base_loss:.4f}")
    print(f"held_out_loss surprise_repair {repair_loss:.4f}")
    print(f"trigger fired {counters['fired']} injected {counters['injected']} of {counters['seen']} samples seen")
    prompt = test_x[: cfg["samples"], : gen_cfg["prompt"]]
    decode = lambda row: "".join(chars[i] for i in row.tolist()).replace("\n", " ")  # noqa: E731
    for label, flag in (("plain", False), ("sandwich", True)):
        for i, row in enumerate(sandwich(model, prompt, with_sandwich=flag, seed=1)):
            print(f"sample {label} {i}: {decode(row)!r}")


if __name__ == "__main__":
    main()
