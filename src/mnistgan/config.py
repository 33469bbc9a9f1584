"""Every hyperparameter of a run, with the reference recipe as defaults."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass


@dataclass
class Config:
    """The reference recipe (see README): change a field to change the run.

    Generator: z (latent_dim, standard normal) -> g_hidden -> image_dim,
    ReLU then batch norm after each hidden layer, tanh output.
    Discriminator: image_dim -> d_hidden -> 1, ReLU hidden layers, sigmoid
    output (folded into the loss). BCE loss, non-saturating generator loss,
    Adam. Instance noise: Gaussian noise of std `instance_noise` added to
    every image D sees, annealed linearly to 0 over the run.
    """

    latent_dim: int = 100
    g_hidden: tuple[int, ...] = (128, 256, 512, 1024)
    d_hidden: tuple[int, ...] = (628, 471, 314, 157)
    image_dim: int = 784
    batch_size: int = 50
    epochs: int = 10
    lr: float = 0.0002
    beta1: float = 0.5
    beta2: float = 0.999
    adam_eps: float = 1e-8
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    instance_noise: float = 0.1
    label_smoothing: float = 0.0  # one-sided: D's target for real images is 1 - this
    dtype: str = "float32"
    seed: int = 0

    def __post_init__(self):
        self.g_hidden = tuple(int(x) for x in self.g_hidden)
        self.d_hidden = tuple(int(x) for x in self.d_hidden)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that makes no sense."""
        def need(ok, name, rule):
            if not ok:
                raise ValueError(f"config.{name} = {getattr(self, name)!r}: {rule}")

        for name in ("latent_dim", "image_dim", "batch_size", "epochs"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool), name, "must be an integer")
        need(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        need(self.image_dim >= 1, "image_dim", "must be >= 1")
        need(self.batch_size >= 2, "batch_size", "must be >= 2 (batch norm needs 2 rows)")
        need(self.epochs >= 0, "epochs", "must be >= 0")
        need(all(h >= 1 for h in self.g_hidden), "g_hidden", "widths must be >= 1")
        need(all(h >= 1 for h in self.d_hidden), "d_hidden", "widths must be >= 1")
        need(_finite(self.lr) and self.lr > 0, "lr", "must be a finite number > 0")
        need(_finite(self.beta1) and 0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(_finite(self.beta2) and 0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(_finite(self.adam_eps) and self.adam_eps > 0, "adam_eps", "must be > 0")
        need(_finite(self.bn_momentum) and 0 <= self.bn_momentum <= 1, "bn_momentum", "must be in [0, 1]")
        need(_finite(self.bn_eps) and self.bn_eps > 0, "bn_eps", "must be > 0")
        need(_finite(self.instance_noise) and self.instance_noise >= 0, "instance_noise", "must be >= 0")
        need(_finite(self.label_smoothing) and 0 <= self.label_smoothing < 0.5, "label_smoothing",
             "must be in [0, 0.5)")
        need(self.dtype in ("float32", "float64"), "dtype", "must be 'float32' or 'float64'")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "must be an integer >= 0")

    @property
    def architecture(self) -> dict:
        """The fields that fix the shapes of the parameters."""
        return {"latent_dim": self.latent_dim, "g_hidden": list(self.g_hidden),
                "d_hidden": list(self.d_hidden), "image_dim": self.image_dim,
                "dtype": self.dtype}

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["g_hidden"] = list(self.g_hidden)
        d["d_hidden"] = list(self.d_hidden)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> "Config":
        return cls.from_dict(json.loads(text))


# Named recipes: field overrides of the reference recipe (the default).
# benchmarks/quality.py and benchmarks/QUALITY.md say where each comes from.
RECIPES: dict[str, dict] = {
    "reference": {},
    # The best variant of the study (seed 0, 12,000 steps: FID 107.7 against
    # the reference's 144.8 for the same seed; see benchmarks/QUALITY.md).
    "label-smoothing": {"label_smoothing": 0.1},
}


def recipe(name: str, **overrides) -> Config:
    """The Config of a named recipe, with further field overrides."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    return Config(**{**RECIPES[name], **overrides})


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
