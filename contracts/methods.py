"""Which federated method a run trains: DRESS, or a peer it is judged against, on the same fleet and plumbing.

A method decides three things the ServerApp and the ClientApp must agree on: the global model (DRESS's nested
row-sparse backbone, or a width-nested twin with the same parameter count per density), which density a device
whose budget allows a given one trains, and how it trains it (``agent.client_app``). Everything else — devices, budgets, data
split, rounds, local epochs, examples — is the run's, whatever the method.

- ``dress``: every device trains its own density of the nested row-sparse backbone (by default; ``--joint``
  may add the sparser ones).
- ``heterofl``: each device trains the width prefix of its density; static BN, scaler, logits masked to the
  device's own labels, gradients clipped to norm 1, and every weight averaged over the devices that hold it,
  each class's classifier row over the devices holding that class, one vote per device (Diao et al. 2021, as
  Flower's ``baselines/heterofl``).
- ``fjord``: ordered dropout — each local step trains a width drawn uniformly up to the device's density, per
  device (Horváth et al. 2021).
- ``fjord-kd``: FjORD with its self-distillation as published (Flower's ``baselines/fjord``): every step also
  trains the device's widest subnet on the labels, and the drawn one learns from its soft predictions alone.
- ``fedavg-small``: every device trains the one dense model that fits the sparsest density.
- ``fedavg-capable``: dense FedAvg of the full model, on only the devices whose density is the densest.
"""

from __future__ import annotations

from dataclasses import dataclass

from dress_model.baselines.slimmable import width_twin
from dress_model.models import DressModel

METHODS = ("dress", "heterofl", "fjord", "fjord-kd", "fedavg-small", "fedavg-capable")


@dataclass(frozen=True)
class Method:
    name: str
    bn: str = "static"
    scaler: bool = False
    subnets: str = "all"  # which of the backbone's densities the model has: all, or only the "weakest" / "densest"
    sampled: bool = False  # FjORD: each step draws its width
    kd: bool = False  # FjORD-KD: the widest subnet teaches the drawn one every step
    label_split: bool = False  # HeteroFL: logits masked to the device's labels; class rows averaged by holders
    per_device: bool = False  # HeteroFL: an average counts devices (one vote each), not their examples
    clip_norm: float = 0.0  # gradient norm clipped to this on every local step (0 = off)

    def densities_of(self, densities: tuple[float, ...]) -> tuple[float, ...]:
        return {"all": densities, "weakest": densities[:1], "densest": densities[-1:]}[self.subnets]

    def build(self, dress: DressModel) -> DressModel:
        """The global model: ``dress`` itself, or its width-nested twin. ValueError for a density it cannot build."""
        if self.name == "dress":
            return dress
        return width_twin(dress, bn=self.bn, scaler=self.scaler, levels=self.densities_of(dress.densities))

    def density_for(self, allowed: float, densities: tuple[float, ...]) -> float | None:
        """The density of the method's model (``densities``) a device whose budget allows ``allowed`` (one of
        the backbone's densities) trains, or None when this method leaves it out."""
        if self.subnets == "weakest":
            return densities[0]
        return allowed if allowed in densities else None


_METHODS = {
    "dress": Method("dress"),
    "heterofl": Method("heterofl", scaler=True, label_split=True, per_device=True, clip_norm=1.0),
    "fjord": Method("fjord", sampled=True),
    "fjord-kd": Method("fjord-kd", sampled=True, kd=True),
    "fedavg-small": Method("fedavg-small", subnets="weakest"),
    "fedavg-capable": Method("fedavg-capable", subnets="densest"),
}
assert tuple(_METHODS) == METHODS


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None

