"""Models behind one constructor, ``create_model``: a small CNN for fleets and CIFAR-style ResNets.

Each architecture is written once against a *family* that supplies its layers: ``DressFamily`` here (row-sparse
body, dense stem and classifier, per-density BN); the baselines (``dress_model/baselines/``) pass their own
families to the same constructors, so every method runs the same network. The stem and the classifier stay dense
in DRESS: together they hold ~1% of the CNN's weights, and sparsifying the 1-channel
stem leaves rows of 9 weights, where a 10% row keeps a single tap (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import torch
from torch import nn

from dress_model.data import dataset_shape
from dress_model.layers import DensityAware, DensityBatchNorm, DensityCell, DressConv2d, DressLinear, RowSparse
from dress_model.sparsity import DEFAULT_DENSITIES, Importance, check_level, level_of, magnitude, parse_densities

Role = Literal["stem", "body", "head"]


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a model; stored in checkpoint headers."""

    name: str
    densities: tuple[float, ...]
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 28
    width: int = 16
    bn_affine: Literal["per-density", "shared"] = "per-density"

    def __post_init__(self) -> None:
        """A stored architecture comes from a file someone else wrote: every field is checked before use."""
        if not isinstance(self.name, str) or self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; expected one of {sorted(MODELS)}")
        if parse_densities(self.densities) != tuple(self.densities):
            raise ValueError(f"densities must be ascending, got {list(self.densities)}")
        for name, low, high in _SIZE_LIMITS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"architecture {name} must be an integer in [{low}, {high}], got {value!r}")
        if self.bn_affine not in ("per-density", "shared"):
            raise ValueError(f"architecture bn_affine must be 'per-density' or 'shared', got {self.bn_affine!r}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Architecture:
        data = {k: v for k, v in data.items() if k not in _LEGACY_FIELDS or v != _LEGACY_FIELDS[k]}
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown architecture fields {sorted(unknown)}; expected {sorted(known)}")
        if not isinstance(data.get("densities"), list):
            raise ValueError(f"architecture densities must be a list of numbers, got {data.get('densities')!r}")
        return cls(**{**data, "densities": tuple(data["densities"])})


# (field, lowest, highest): far beyond any edge model, small enough that a declared size cannot ask for terabytes.
_SIZE_LIMITS = (("in_channels", 1, 64), ("num_classes", 1, 100_000), ("image_size", 4, 4096), ("width", 1, 4096))

# Fields checkpoints of version 0.1 wrote with these values; they carry no information for a DRESS model.
_LEGACY_FIELDS: dict[str, object] = {"family": "dress", "slim_widths": []}


class Family(Protocol):
    """Layer factory: ``role`` says where a layer sits, so a family can keep the stem and head dense."""

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, role: Role = "body") -> nn.Module: ...

    def linear(self, fin: int, fout: int, role: Role = "body") -> nn.Module: ...

    def norm(self, c: int) -> nn.Module: ...


class DressFamily:
    """DRESS layers: row-sparse body, dense stem and classifier, per-density batch norm."""

    def __init__(self, arch: Architecture) -> None:
        self.arch = arch
        self.d = arch.densities

    def conv(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0, role: Role = "body") -> nn.Module:
        if role == "body":
            return DressConv2d(cin, cout, k, self.d, stride=stride, padding=padding)
        return nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)

    def linear(self, fin: int, fout: int, role: Role = "body") -> nn.Module:
        if role == "body":
            return DressLinear(fin, fout, self.d)
        return nn.Linear(fin, fout)

    def norm(self, c: int) -> nn.Module:
        return DensityBatchNorm(c, self.d, affine=self.arch.bn_affine)


FamilyFactory = Callable[[Architecture], Family]


class DressModel(nn.Module):
    """A network whose density-aware modules switch together; ``set_density`` is O(#modules)."""

    def __init__(self, arch: Architecture) -> None:
        super().__init__()
        self.arch = arch
        self.densities = arch.densities
        self._cell = DensityCell(len(arch.densities) - 1)

    def link_density(self) -> None:
        """Make every density-aware module read this model's one cell (after building or swapping modules)."""
        self._cell.index = len(self.densities) - 1
        for m in self.modules():
            if isinstance(m, DensityAware):
                m.share_cell(self._cell)

    def level_of(self, density: float) -> int:
        """The level (index in ``densities``) of one of this model's densities; ValueError for another."""
        return level_of(self.densities, density)

    def set_density(self, density: float) -> None:
        """O(1): every density-aware module reads the same cell."""
        self._cell.index = self.level_of(density)

    @property
    def active_density(self) -> float:
        return self.densities[self._cell.index]

    @property
    def active_level(self) -> int:
        """The active density's index in ``densities``: what the packed runtime keys its compiled forwards by."""
        return self._cell.index

    @active_level.setter
    def active_level(self, index: int) -> None:
        self._cell.index = check_level(self.densities, index)

    def sparse_layers(self) -> Iterator[tuple[str, RowSparse]]:
        for name, m in self.named_modules():
            if isinstance(m, RowSparse):
                yield name, m

    @torch.no_grad()
    def rerank(self, importance: Importance = magnitude) -> None:
        for _, layer in self.sparse_layers():
            layer.rerank(importance)

    @torch.no_grad()
    def grow_from(self, density: float) -> None:
        """Zero every sparse weight outside the ``density`` prefix, so every denser subnet starts as that one.

        How a federated run starts: most devices may train only the sparsest subnet for many rounds, and random
        initial weights left in the bands above it would rank among the trained ones at every re-ranking and
        add noise to every denser subnet. Grown from zero, a band holds only what devices taught it."""
        self.level_of(density)
        for _, layer in self.sparse_layers():
            layer.weight.mul_(layer.mask(density))

    def subnet_params(self, density: float) -> int:
        """Weights a device must hold for this subnet: kept sparse weights + dense layers + its BN affine."""
        self.level_of(density)  # a density the model lacks is an error, not zero weights
        total = 0
        for m in self.modules():
            if isinstance(m, RowSparse):
                total += m.rows * m.keep(density) + (m.bias.numel() if m.bias is not None else 0)
            elif isinstance(m, DensityBatchNorm):
                total += m.weight.shape[1] * 2
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                total += sum(p.numel() for p in m.parameters(recurse=False))
        return total


class SmallCNN(DressModel):
    """Two conv blocks and two FC layers: ~0.2M weights, cheap enough for 100 simulated devices on 2 cores."""

    def __init__(self, arch: Architecture, f: Family) -> None:
        super().__init__(arch)
        w = arch.width
        self.conv1, self.bn1 = f.conv(arch.in_channels, w, 3, padding=1, role="stem"), f.norm(w)
        self.conv2, self.bn2 = f.conv(w, 2 * w, 3, padding=1), f.norm(2 * w)
        self.pool = nn.MaxPool2d(2)
        feat = arch.image_size // 4
        self.fc1, self.bn3 = f.linear(2 * w * feat * feat, 8 * w), f.norm(8 * w)
        self.fc2 = f.linear(8 * w, arch.num_classes, role="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        x = torch.relu(self.bn3(self.fc1(torch.flatten(x, 1))))
        return self.fc2(x)


class BasicBlock(nn.Module):
    def __init__(self, f: Family, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = f.conv(cin, cout, 3, stride=stride, padding=1), f.norm(cout)
        self.conv2, self.bn2 = f.conv(cout, cout, 3, padding=1), f.norm(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(f.conv(cin, cout, 1, stride=stride), f.norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(DressModel):
    """CIFAR-style ResNet (He et al. 2016): 3 stages of basic blocks, widths w, 2w, 4w; depth = 6n + 2."""

    def __init__(self, arch: Architecture, f: Family, blocks_per_stage: int) -> None:
        super().__init__(arch)
        w = arch.width
        self.conv1, self.bn1 = f.conv(arch.in_channels, w, 3, padding=1, role="stem"), f.norm(w)
        layers: list[nn.Module] = []
        cin = w
        for stage, cout in enumerate((w, 2 * w, 4 * w)):
            for b in range(blocks_per_stage):
                layers.append(BasicBlock(f, cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = f.linear(cin, arch.num_classes, role="head")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


MODELS: dict[str, Callable[[Architecture, Family], DressModel]] = {
    "cnn": SmallCNN,
    "resnet8": lambda a, f: CifarResNet(a, f, blocks_per_stage=1),
    "resnet20": lambda a, f: CifarResNet(a, f, blocks_per_stage=3),
}


def create_model(
    name: str | Architecture,
    densities: str | tuple[float, ...] = DEFAULT_DENSITIES,
    *,
    family: FamilyFactory = DressFamily,
    **kwargs: object,
) -> DressModel:
    """Build any model by name (or from a stored Architecture), with DRESS layers unless ``family`` says else."""
    if isinstance(name, Architecture):
        arch = name
    else:
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
        arch = Architecture(name=name, densities=parse_densities(densities), **kwargs)  # type: ignore[arg-type]
    if arch.name not in MODELS:
        raise ValueError(f"unknown model {arch.name!r}; expected one of {sorted(MODELS)}")
    model = MODELS[arch.name](arch, family(arch))
    model.link_density()
    return model


def architecture_for_dataset(name: str, densities: str | tuple[float, ...], dataset: str,
                             width: int = Architecture.width) -> Architecture:
    """The architecture of model ``name`` shaped for ``dataset``'s images and classes."""
    (channels, size, _), classes = dataset_shape(dataset)
    return Architecture(name=name, densities=parse_densities(densities), in_channels=channels, num_classes=classes,
                        image_size=size, width=width)

