"""Model checkpoints, shared by train (writes them), infer and predict (read them): one file, plain data only.

A checkpoint (``model.pt``) is a dict of tensors and plain Python values, never pickled objects, so it loads with
``torch.load(weights_only=True)``: a file whose unpickling would run code is refused, not executed. It holds:

* ``format`` / ``version``: what wrote it;
* ``config``: the resolved config the model was trained with (preprocessing, network, classes);
* ``plan``: the data plan it was trained on (``results/plan/plan.json``);
* ``contract``: what the training data were (modalities, spacing range, intensity fingerprint), which predict
  checks new series against;
* ``members``: one ``{"state_dict", "fold", "epoch", "val_dice"}`` per network: one for a single model, one per fold
  for a cross-validation ensemble, whose probabilities are averaged.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medseg.config import Config, validate_config
from medseg.errors import ConfigError, ModelLoadError
from medseg.io import atomic_path
from medseg.networks import build_network

FORMAT = "medseg-checkpoint"
VERSION = 3


class Ensemble(torch.nn.Module):
    """Networks of the same architecture whose softmax probabilities are averaged (nnU-Net's fold ensemble).

    Returns the log of the mean probability, so that a softmax downstream gives the mean probability back and the
    sliding window blends it like logits. A one-member ensemble returns that member's logits unchanged.
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.members) == 1:
            return self.members[0](x)
        total = sum(torch.softmax(m(x), dim=1) for m in self.members)
        return torch.log(torch.clamp(total / len(self.members), min=1e-8))  # type: ignore[operator]


@dataclass
class Checkpoint:
    """A loaded checkpoint: the config it was trained with, and its plain-data parts."""

    config: Config
    members: list[dict[str, Any]]
    plan: dict[str, Any] = field(default_factory=dict)
    contract: dict[str, Any] = field(default_factory=dict)

    def network(self, device: torch.device | str = "cpu") -> torch.nn.Module:
        """The members as one module in eval mode on ``device`` (an :class:`Ensemble`, or the single network)."""
        nets = []
        for member in self.members:
            net = build_network(self.config.train, self.config.num_classes)
            net.load_state_dict(member["state_dict"])
            nets.append(net)
        model = nets[0] if len(nets) == 1 else Ensemble(nets)
        return model.to(device).eval()


def save_checkpoint(
    path: Path,
    config: Config,
    members: Sequence[dict[str, Any]],
    plan: dict[str, Any] | None = None,
    contract: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically. ``members``: ``{"state_dict", "fold", "epoch", "val_dice"}`` each."""
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "plan": plan or {},
        "contract": contract or {},
        "members": [dict(m) for m in members],
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_state(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """``torch.load`` that only accepts tensors and plain data (``weights_only=True``).

    Raises:
        ModelLoadError: the file is missing, not a torch file, or holds objects whose loading could run code.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ModelLoadError(
            f"{path.name}: refused: it is not a plain-data checkpoint (loading it would run Python code or it is "
            f"not a torch file). medseg only loads checkpoints of tensors and plain values. ({str(err)[:200]})"
        ) from err
    except Exception as err:  # torch raises many types for a file that is not a checkpoint (IndexError for text)
        raise ModelLoadError(
            f"{path.name}: refused: not a readable medseg checkpoint ({type(err).__name__}: {str(err)[:200]})"
        ) from err
    if not isinstance(state, dict):
        raise ModelLoadError(f"{path.name}: not a medseg checkpoint (holds a {type(state).__name__})")
    return state


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Read a ``model.pt`` written by :func:`save_checkpoint`.

    Raises:
        ModelLoadError: not a loadable medseg checkpoint.
    """
    state = load_state(path, device)
    if state.get("format") != FORMAT or "members" not in state or "config" not in state:
        raise ModelLoadError(f"{Path(path).name}: not a medseg checkpoint (written by `medseg train`)")
    try:
        config = validate_config(state["config"], source=f"{Path(path).name} (embedded config)")
    except ConfigError as err:
        raise ModelLoadError(str(err)) from err
    if config.train.patch_size_vox is None or config.train.channels is None:
        raise ModelLoadError(f"{Path(path).name}: its config is not resolved by a plan (no patch size or channels)")
    return Checkpoint(config, list(state["members"]), dict(state.get("plan") or {}), dict(state.get("contract") or {}))


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Config]:
    """The trained network (or fold ensemble) in eval mode on ``device``, and the config it was trained with."""
    checkpoint = load_checkpoint(path, device)
    return checkpoint.network(device), checkpoint.config
