"""A learned policy: a small MLP predicts each paradigm's tau from the round's features; the choice maximises the
predicted tau over the predicted latency (or ``tau - lam * T_ms``). Trained by ``whiflash train-policy`` on oracle
traces (every paradigm drafted from the same prefix), stored as ``config.json`` + ``model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from whiflash_sgl.drafters.checkpoint import WEIGHTS_DIR
from whiflash_sgl.errors import WhiFlashError
from whiflash_sgl.router import Decision, RoundFeatures, best_paradigm

DEFAULT_PATH = WEIGHTS_DIR / "smollm2-135m" / "router-mlp"


class RouterMLP(nn.Module):
    """Standardised features -> predicted tau per paradigm (at least 1: the bonus token)."""

    def __init__(self, num_features: int, paradigms: list[str], hidden: int = 32):
        super().__init__()
        self.paradigms = list(paradigms)
        self.register_buffer("mean", torch.zeros(num_features))
        self.register_buffer("std", torch.ones(num_features))
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, len(paradigms)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 + nn.functional.softplus(self.net((x - self.mean) / self.std))

    def save(self, path: Path, extra: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        config = {"num_features": self.mean.numel(), "paradigms": self.paradigms,
                  "hidden": self.net[0].out_features, **extra}
        (path / "config.json").write_text(json.dumps(config, indent=1))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))

    @classmethod
    def load(cls, path: Path) -> "RouterMLP":
        config_file, weights = path / "config.json", path / "model.safetensors"
        if not config_file.is_file() or not weights.is_file():
            raise WhiFlashError(f"no router MLP at {path} (config.json + model.safetensors); train one with "
                                f"`whiflash train-policy` or pass path=... in --policy-config")
        config = json.loads(config_file.read_text())
        model = cls(config["num_features"], config["paradigms"], config["hidden"])
        model.load_state_dict(load_file(str(weights)))
        return model.eval()


class MLPPolicy:
    def __init__(self, path: str = "", lam: float | None = None):
        self.model = RouterMLP.load(Path(path) if path else DEFAULT_PATH)
        self.lam = lam

    def decide(self, f: RoundFeatures) -> Decision:
        paradigms = self.model.paradigms
        missing = [p for p in paradigms if p not in f.ema_tau]
        if missing:
            raise ValueError(f"the MLP was trained for paradigms {paradigms}; the router lacks {missing}")
        with torch.no_grad():
            tau = self.model(torch.tensor([f.vector()]))[0].tolist()
        return Decision(best_paradigm(dict(zip(paradigms, tau)), f.predicted_seconds, self.lam))
