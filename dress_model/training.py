"""Joint training of the nested subnets, and per-density evaluation: one job, the training loop and the rules
for what each of its steps trains (``JOINT_RULES``), which is why it runs past 400 lines.

By default each step runs forward+backward once per density on the same batch and steps on the weighted sum
of their losses; gradients of all subnets land in the one shared set of weights. Other rules pick fewer
densities a step (a device's own, the sandwich, one drawn). The per-row importance order is re-ranked on a
schedule so the sparse prefixes follow the weights as they move.

The model is either a ``DressModel`` (dense weights under masks: centralized training, where rows re-rank)
or a ``PackedModel`` (the packed values themselves, masks fixed as packed: what a device trains).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dress_model.layers import DensityBatchNorm, RowSparse
from dress_model.models import DressModel
from dress_model.packed import PackedModel
from dress_model.packed_layer import PackedSparse
from dress_model.sparsity import get_importance

log = logging.getLogger(__name__)

Trainable = DressModel | PackedModel

StepCallback = Callable[[int, int, dict[float, float]], None]
"""Called after every step with (step, total_steps, loss per density)."""


@dataclass
class TrainConfig:
    densities: tuple[float, ...] | None = None  # which of the model's densities to train; None = all
    loss_weights: tuple[float, ...] | None = None  # one per density (ascending order); None = equal
    epochs: float = 1.0
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rerank_every: int = 100  # steps between re-rankings of the row order; 0 = never (fixed masks)
    importance: str = "magnitude"
    recalibrate_batches: int = 50  # >0: recompute per-density BN statistics after training (ablation: helps)
    distill: float = 0.0  # weight of the anchor loss for every density above the sparsest (see ``train``)
    classes: tuple[int, ...] | None = None  # HeteroFL: only these classes' logits count (the rest read 0)
    label_counts: tuple[int, ...] | None = None  # the device's examples per class, for ``logit_adjust``
    logit_adjust: float = 0.0  # > 0: the loss sees logits + this × log of the label frequencies (``LogitView``)
    clip_norm: float = 0.0  # clip the gradient to this norm before every step (0 = off)
    joint: str = "all"  # what a step trains: "all", "sum" or "band" (every density, ``joint_step``), "sandwich",
    # "own" (the densest of the densities alone: a device trains its own subnet, the sparser ones nested in it)
    # "ends" (the densest and the sparsest, losses summed), "sandwich-labels" (the sandwich's densities, each
    # on the labels, losses summed) or "own-drawn" (one density a step: the densest on OWN_SHARE of the steps, a
    # sparser one drawn uniformly on the others)
    extra: dict = field(default_factory=dict)

    def weights_for(self, densities: Sequence[float]) -> list[float]:
        if self.loss_weights is None:
            return [1.0 / len(densities)] * len(densities)
        if len(self.loss_weights) != len(densities):
            raise ValueError(
                f"need one loss weight per density: {len(densities)} densities, {len(self.loss_weights)} weights"
            )
        if any(w < 0 or math.isnan(w) for w in self.loss_weights) or sum(self.loss_weights) <= 0:
            raise ValueError(f"loss weights must be >= 0 with a positive sum, got {list(self.loss_weights)}")
        return list(self.loss_weights)


@dataclass(frozen=True)
class LogitView:
    """What a device's loss sees of its model's logits. ``mask`` (bool, per class): HeteroFL's masking, the other
    classes' logits read 0. ``offset``: added to the logits, ``logit_adjust`` × the log of the device's own label
    frequencies (logit adjustment, Menon et al. 2021; FedLC): the softmax then carries the shard's label skew, so
    the model need not learn it, and what a device with few classes sends back is not biased towards them."""

    mask: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __call__(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if self.offset is not None:
            logits = logits + self.offset
        return logits if self.mask is None else logits.masked_fill(~self.mask, 0.0)

    @property
    def plain(self) -> bool:
        return self.mask is None and self.offset is None


PLAIN = LogitView()


def joint_step(
    model: Trainable,
    x: torch.Tensor,
    y: torch.Tensor,
    densities: Sequence[float],
    weights: Sequence[float],
    optimizer: torch.optim.Optimizer,
    anchor: Trainable | None = None,
    distill: float = 0.0,
    view: LogitView = PLAIN,
    clip_norm: float = 0.0,
    band_mean: bool = False,
) -> dict[float, float]:
    """One optimizer step on sum_d w_d * loss_d; backward per density keeps peak memory at one subnet.
    ``band_mean`` then divides each weight's gradient by how many of the subnets hold it (``band_mean_``).

    With an ``anchor``, every density above the anchor's trains on ``(1 - distill) * CE + distill * KL(anchor
    || subnet)``: the anchor's predictions on the same batch are soft targets the denser subnets must not stray
    from. ``view`` is what the loss sees of the logits (``LogitView``: HeteroFL's mask to a device's own labels, a
    device's label prior); ``clip_norm`` > 0 clips the summed gradient before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    targets = None
    if anchor is not None and distill > 0:
        with torch.no_grad():
            targets = F.log_softmax(view(anchor, x), dim=1)  # through the same view: like is compared with like
    losses: dict[float, float] = {}
    for d, w in zip(densities, weights):
        model.set_density(d)
        logits = view(model, x)
        loss = F.cross_entropy(logits, y)
        losses[d] = loss.item()
        if targets is not None and d > anchor.active_density:
            kl = F.kl_div(F.log_softmax(logits, dim=1), targets, log_target=True, reduction="batchmean")
            loss = (1 - distill) * loss + distill * kl
        (w * loss).backward()
    if band_mean:
        band_mean_(model, densities)
    clip_gradients(model, clip_norm)
    optimizer.step()
    return losses


@torch.no_grad()
def band_mean_(model: Trainable, densities: Sequence[float]) -> None:
    """Divide each parameter element's summed gradient by how many of ``densities``' subnets hold it: every
    weight then moves by the mean gradient of the subnets it serves.

    Why: under the mean over k densities the prefix gets the mean of k gradients but a band only the densest
    subnet holds gets 1/k of one, so upper bands learn k times slower than the prefix; summing the losses fixes
    the bands but takes k times larger steps on the prefix. Counted per element: a row-sparse weight by the
    masks (a packed layer by its bands), a per-density BN row is its density's alone, the rest is shared."""
    trained = sorted(model.level_of(d) for d in densities)
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, RowSparse) and module.weight.grad is not None:
            count = sum(module.mask(model.densities[i]) for i in trained)
            module.weight.grad.div_(count.clamp_min(1))
            counted.add(id(module.weight))
        elif isinstance(module, PackedSparse) and module.values.grad is not None:
            for band, (offset, width) in enumerate(module.bands.tolist()):
                holders = sum(1 for i in trained if i >= band)  # band b belongs to density index b and above
                module.values.grad[offset: offset + module.rows * width].div_(max(holders, 1))
            counted.add(id(module.values))
        elif isinstance(module, DensityBatchNorm) and module.affine == "per-density":
            counted.update((id(module.weight), id(module.bias)))
    for p in model.parameters():
        if p.grad is not None and id(p) not in counted:
            p.grad.div_(len(trained))


JOINT_RULES = ("all", "sum", "band", "sandwich", "own", "ends", "sandwich-labels", "own-drawn")  # every density:
# loss_weights (mean by default), summed, or summed then each weight's gradient divided by its subnets (band_mean_);
# the sandwich; the densest alone; the densest and the sparsest, summed; the sandwich's densities on the labels,
# summed; one a step, the densest or a sparser one drawn
PICKING_RULES = ("sandwich", "own", "ends", "sandwich-labels", "own-drawn")  # rules that pick what a step trains
ANCHORED_RULES = ("all", "sum", "band", "own")  # rules whose subnets above the sparsest may be anchored (distill)
OWN_SHARE = 0.5  # own-drawn: the share of steps on the densest (a device's own density); the rest draw a sparser one


def own_drawn_level(densities: Sequence[float], rng: random.Random) -> float:
    """The one density an own-drawn step trains: the densest on OWN_SHARE of the steps, else a sparser one drawn
    uniformly, so that a density no device of the fleet holds as its own is still trained on its own."""
    levels = sorted(densities)
    if len(levels) == 1 or rng.random() < OWN_SHARE:
        return levels[-1]
    return rng.choice(levels[:-1])


def sandwich_levels(densities: Sequence[float], rng: random.Random) -> list[float]:
    """The densities one sandwich step trains, densest first: the densest, the sparsest, and one drawn
    uniformly from those between (when there are any)."""
    levels = sorted(densities, reverse=True)
    if len(levels) == 1:
        return levels
    drawn = [rng.choice(levels[1:-1])] if len(levels) > 2 else []
    return [levels[0], *drawn, levels[-1]]


def sandwich_step(
    model: Trainable,
    x: torch.Tensor,
    y: torch.Tensor,
    densities: Sequence[float],
    optimizer: torch.optim.Optimizer,
    rng: random.Random,
    clip_norm: float = 0.0,
) -> dict[float, float]:
    """One optimizer step of the sandwich rule with in-place distillation (slimmable and once-for-all training):
    the densest of ``densities`` learns from the labels, the sparsest and one drawn between them from its
    detached soft predictions, and the gradients add up before the step.

    Why, over ``joint_step``'s mean over every density: the weights only the densest subnet holds get its whole
    gradient (in the mean they get 1/k of it, so a fleet's upper bands learn at a fraction of the rate), the
    smaller subnets follow the densest one rather than pulling it towards themselves, and a step costs the
    densest subnet and two smaller ones, not every density."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    top, *students = sandwich_levels(densities, rng)
    model.set_density(top)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    losses = {top: loss.item()}
    teacher = logits.detach().softmax(dim=1)
    for d in students:
        model.set_density(d)
        loss = F.cross_entropy(model(x), teacher)
        loss.backward()
        losses[d] = loss.item()
    clip_gradients(model, clip_norm)
    optimizer.step()
    return losses


def local_steps(epochs: float, batches: int) -> int:
    """Steps of ``epochs`` passes over ``batches`` batches: at least one (a fraction of a pass rounds)."""
    return max(1, round(epochs * batches))


def clip_gradients(model: torch.nn.Module, clip_norm: float) -> None:
    """Clip the model's gradient to ``clip_norm`` (0: leave it)."""
    if clip_norm:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], clip_norm)


def logit_view(config: TrainConfig, num_classes: int) -> LogitView:
    """The ``LogitView`` of ``config.classes`` and ``config.logit_adjust``. The label frequencies are smoothed by
    one example per class (Laplace), so a class the device never sees is pushed far down, not to -inf."""
    mask = None
    if config.classes is not None:
        mask = torch.zeros(num_classes, dtype=torch.bool)
        mask[list(config.classes)] = True
    offset = None
    if config.logit_adjust < 0 or math.isnan(config.logit_adjust):
        raise ValueError(f"logit_adjust must be >= 0, got {config.logit_adjust}")
    if config.logit_adjust > 0:
        if config.label_counts is None or len(config.label_counts) != num_classes:
            raise ValueError(f"logit_adjust needs label_counts, one per class ({num_classes}), got "
                             f"{config.label_counts}")
        counts = torch.tensor(config.label_counts, dtype=torch.float32) + 1.0
        offset = config.logit_adjust * torch.log(counts / counts.sum())
    return LogitView(mask, offset)


def frozen_anchor(model: Trainable, density: float) -> Trainable:
    """A frozen copy of ``model``'s ``density`` subnet as it is now, in inference mode (its BN statistics)."""
    anchor = copy.deepcopy(model).eval()
    anchor.set_density(density)
    for p in anchor.parameters():
        p.requires_grad_(False)
    return anchor


WARMUP_SHARE = 0.15  # of a run's steps: the learning rate climbs from WARMUP_START of its peak
WARMUP_START = 1 / 25


def lr_share(step: int, total: int) -> float:
    """The share of the peak learning rate that step ``step`` (0-based) of ``total`` takes.

    A one-cycle shape — a linear warm-up over the first ``WARMUP_SHARE`` of the steps, then a cosine towards 0
    — but no step is wasted: the cosine reaches 0 only at step ``total``, which is never taken, and a run too
    short to warm up starts at the peak. One step is plain SGD at the peak (a device whose shard fits one
    batch: federated SGD at the round's rate), two are 1 and 0.5. (torch's OneCycleLR took its last step at
    peak/25/1e4: a one-step device never moved its model.)"""
    if not 0 <= step < total:
        raise ValueError(f"step must be in [0, {total}), got {step}")
    warmup = int(WARMUP_SHARE * total)
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Nesterov SGD under ``lr_share``'s one-cycle shape: the one recipe every method here trains with."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        nesterov=config.momentum > 0,  # torch refuses Nesterov without momentum
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_share(min(step, total_steps - 1),
                                                                                  total_steps))
    return optimizer, schedule


def train(
    model: Trainable,
    loader: DataLoader,
    config: TrainConfig,
    on_step: StepCallback | None = None,
    seed: int = 0,
) -> dict[float, float]:
    """Train jointly for ``config.epochs`` (fractions allowed); returns the last step's losses.

    ``config.distill > 0`` anchors the denser subnets to the sparsest one *as it was when training started*
    (a device: as the server sent it). In a fleet most devices train only the sparsest subnet, so it holds the
    fleet's consensus; a device that also trains denser bands on its few local examples pulls them towards its
    own data, and the anchor keeps them close to what the whole fleet learnt (the federated ablation: without
    it the densest subnet ends below the sparsest on non-IID data); under "own" a device's one subnet is so
    anchored (one more forward of the sparsest a step). ``config.joint`` "sandwich" trains by
    ``sandwich_step`` instead, and "sandwich-labels" draws the same densities each step but trains each on the
    labels, and "own-drawn" trains one density a step (``own_drawn_level``); their draws are seeded by ``seed``."""
    densities = tuple(config.densities or model.densities)
    for d in densities:
        model.level_of(d)  # fail early on a density the model lacks
    if not 0 <= config.distill < 1:
        raise ValueError(f"distill must be in [0, 1), got {config.distill}")
    if config.joint not in JOINT_RULES:
        raise ValueError(f"joint must be one of {', '.join(JOINT_RULES)}, got {config.joint!r}")
    sandwich = config.joint == "sandwich"
    drawn = config.joint == "sandwich-labels"  # each step draws its densities, as the sandwich does
    own_drawn = config.joint == "own-drawn"
    if config.distill and config.joint not in ANCHORED_RULES:
        raise ValueError(f"joint {config.joint!r} picks what its subnets learn from: it takes no distill (anchor to "
                         f"the sparsest; {', '.join(ANCHORED_RULES)} do)")
    anchor = frozen_anchor(model, densities[0]) if config.distill > 0 and len(densities) > 1 else None
    if config.joint in PICKING_RULES and not sandwich:  # fewer subnets a step: a budget buys more steps
        if config.loss_weights:
            raise ValueError(f"joint {config.joint!r} picks the densities it trains: it takes no loss_weights")
        if config.joint == "own":
            densities = densities[-1:]
        elif config.joint == "ends":
            densities = tuple(sorted({densities[0], densities[-1]}))
    view = logit_view(config, model.arch.num_classes)
    if sandwich and (config.loss_weights or not view.plain):
        raise ValueError("the sandwich rule distils from the densest subnet with equal weights on every label: "
                         "it takes no distill (anchor to the sparsest), loss_weights, classes or logit_adjust")
    if config.joint in ("sum", "band") and config.loss_weights is not None:
        raise ValueError(f"joint {config.joint!r} weighs every density 1: it takes no loss_weights")
    if config.rerank_every and isinstance(model, PackedModel):
        raise ValueError("a packed model trains its subnets as packed (fixed masks): use rerank_every=0")
    weights = ([1.0] * len(densities) if config.joint in ("sum", "band", "ends", "sandwich-labels")
               else config.weights_for(densities))
    importance = get_importance(config.importance)
    total = local_steps(config.epochs, len(loader))
    optimizer, schedule = make_optimizer(model, config, total)
    rng = random.Random(seed)
    step, losses = 0, {}
    while step < total:
        for x, y in loader:
            if sandwich:
                losses = sandwich_step(model, x, y, densities, optimizer, rng, config.clip_norm)
            elif own_drawn:
                losses = joint_step(model, x, y, [own_drawn_level(densities, rng)], [1.0], optimizer,
                                    view=view, clip_norm=config.clip_norm)
            elif drawn:
                picked = sorted(sandwich_levels(densities, rng))
                losses = joint_step(model, x, y, picked, [1.0] * len(picked), optimizer, view=view,
                                    clip_norm=config.clip_norm)
            else:
                losses = joint_step(model, x, y, densities, weights, optimizer, anchor, config.distill, view,
                                    config.clip_norm, band_mean=config.joint == "band")
            schedule.step()
            step += 1
            # Never re-rank on the last step: BN statistics were gathered under the current masks.
            if config.rerank_every and step % config.rerank_every == 0 and step < total:
                model.rerank(importance)
            if on_step:
                on_step(step, total, losses)
            if step >= total:
                break
    if config.recalibrate_batches:
        recalibrate_bn(model, loader, config.recalibrate_batches, densities)
    return losses


def channels_last(model: Trainable) -> Trainable:
    """A channels-last copy of a dense model, for passes over large batches (``evaluate``, ``recalibrate_bn``):
    over NCHW batches on CPU, max-pooling and BN took most of the time, and a federated round's server spent
    most of its own in these two (channels-last: about 1.8x faster). A packed model is returned as it is."""
    return copy.deepcopy(model).to(memory_format=torch.channels_last) if isinstance(model, DressModel) else model


@torch.no_grad()
def recalibrate_bn(model: Trainable, loader: DataLoader, batches: int, densities: Sequence[float]) -> None:
    """Recompute each density's BN running statistics with the final weights (cumulative average)."""
    target, model = model, channels_last(model)
    norms = [m for m in model.modules() if isinstance(m, DensityBatchNorm)]
    model.train()
    for d in densities:
        model.set_density(d)
        i = model.level_of(d)
        for m in norms:
            m.running_mean[i].zero_()
            m.running_var[i].fill_(1.0)
            m.num_batches[i] = 0
            m.momentum = None
        for b, (x, _) in enumerate(loader):
            if b >= batches:
                break
            model(x)
    for m in norms:
        m.momentum = 0.1
    if model is not target:
        target.load_state_dict(model.state_dict())  # the statistics, back into the caller's own tensors
    target.eval()


def evaluate(model: Trainable, loader: DataLoader, densities: Sequence[float] | None = None) -> dict[float, float]:
    """Top-1 accuracy (percent) of every subnet on the same data (a dense model's: of a channels-last copy)."""
    return {d: overall_accuracy(per_class) for d, per_class in class_counts(model, loader, densities).items()}


@torch.no_grad()
def class_counts(model: Trainable, loader: DataLoader, densities: Sequence[float] | None = None
                 ) -> dict[float, tuple[list[int], list[int]]]:
    """Per subnet, (correct, seen) per class on the same data: what a device's accuracy on its own mix of
    classes is computed from (``class_accuracy``), as well as the accuracy over all of them."""
    model = channels_last(model)
    model.eval()
    classes = model.arch.num_classes
    result: dict[float, tuple[list[int], list[int]]] = {}
    for d in densities or model.densities:
        model.set_density(d)
        correct, seen = torch.zeros(classes, dtype=torch.long), torch.zeros(classes, dtype=torch.long)
        for x, y in loader:
            correct += torch.bincount(y[model(x).argmax(1) == y], minlength=classes)
            seen += torch.bincount(y, minlength=classes)
        result[d] = (correct.tolist(), seen.tolist())
    return result


def overall_accuracy(counts: tuple[Sequence[int], Sequence[int]]) -> float:
    """Percent correct over every class of ``class_counts``' (correct, seen)."""
    correct, seen = counts
    return 100.0 * sum(correct) / max(1, sum(seen))


def class_accuracy(counts: tuple[Sequence[int], Sequence[int]], weights: Sequence[float]) -> float:
    """Percent correct on a mix of classes (``weights``, e.g. a device's label histogram) from ``class_counts``'
    (correct, seen): the accuracy a device whose data follows that mix would see."""
    correct, seen = counts
    total = sum(w for w, n in zip(weights, seen) if n)
    if total <= 0:
        raise ValueError("class_accuracy needs weight on at least one class the counts saw")
    return 100.0 * sum(w * c / n for w, c, n in zip(weights, correct, seen) if n) / total
