"""SPELA: learning with a single forward pass (Somasundaram, Mishra, Borthakur, arXiv:2402.09769).

Every trained layer k has fixed unit vectors v_k[c], one per class, of its output width
(`class_vectors`: a regular simplex or an energy-minimising spread). One step, per batch:

    h_0 = the input
    for k = 1..K:
        h_k = act_k(layer_k(normalise(h_{k-1})))          # unit L2 norm in, per sample
        loss_k = -cos(h_k, v_k[y]).mean()                 # a loss local to layer k
        loss_k.backward(); update layer k                 # no gradient crosses layers
        h_k = h_k.detach()                                # only this activation lives on

Prediction is argmax_c cos(h_k, v_k[c]) at the last layer or any earlier one ("early exit").

- `config.py`: `SpelaConfig`, the settings (the seed project's fields);
- `net.py`: `SpelaNet`, the layers, their activations and class vectors;
- `trainer.py`: `SpelaTrainer`, the per-layer step on BaseTrainer.
"""

from .config import SpelaConfig
from .net import SpelaNet
from .trainer import SpelaTrainer

__all__ = ["SpelaConfig", "SpelaNet", "SpelaTrainer"]
