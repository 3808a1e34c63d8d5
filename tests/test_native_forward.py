"""The compiled forward (dress_model.native_forward) against the per-layer path it replaces at inference."""

from __future__ import annotations

import pytest
import torch

from dress_model import kernels
from dress_model.models import create_model
from dress_model.native_forward import FIELDS, FullDensity, NativeForward
from dress_model.packed import PackedModel

SHAPES = {"cnn": (1, 28), "resnet8": (3, 32), "resnet20": (3, 32)}


def packed_model(name: str, densities: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0), seed: int = 0) -> PackedModel:
    """Random weights, ranked rows and random BN statistics, so every fused scale and shift matters."""
    channels, size = SHAPES[name]
    torch.manual_seed(seed)
    model = create_model(name, densities, in_channels=channels, image_size=size, width=8)
    model.rerank()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "running_mean"):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return PackedModel.from_dress(model.eval())


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_subnet_computes_what_the_layer_path_computes(name: str, isa: str) -> None:
    packed = packed_model(name)
    channels, size = SHAPES[name]
    for density in packed.densities:
        packed.set_density(density)
        for batch in (1, 3, 8):
            x = torch.randn(batch, channels, size, size)
            reference = packed.forward_layers(x)
            out = packed(x)
            assert reference.abs().max() > 1e-3  # a real signal, not zeros agreeing with zeros
            torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)
        compiled = packed.compiled(packed.level_of(density))
        # every sparse subnet runs in one native call; the full top subnet whichever way was fastest when it
        # compiled (tested each way below)
        if density == 1.0:
            assert isinstance(compiled, FullDensity) and set(compiled.ways) == {"native", "frozen", "layers"}
            for way in compiled.ways.values():
                torch.testing.assert_close(way(x), packed.forward_layers(x), rtol=1e-4, atol=1e-5)
        else:
            assert isinstance(compiled, NativeForward) and compiled.small_batch_threads in (None, 1, torch.get_num_threads())


def test_switching_density_keeps_each_subnets_own_program() -> None:
    packed = packed_model("resnet8")
    x = torch.randn(2, 3, 32, 32)
    first = {}
    for density in (0.1, 0.5, 0.25):
        packed.set_density(density)
        first[density] = packed(x)
    for density in (0.25, 0.1, 0.5):
        packed.set_density(density)
        torch.testing.assert_close(packed(x), first[density], rtol=0, atol=0)
    assert not torch.allclose(first[0.1], first[0.5])


def test_training_then_inference_runs_the_trained_weights() -> None:
    """Training changes values in place and BN statistics; back in eval mode the compiled forward is rebuilt."""
    packed = packed_model("cnn")
    packed.set_density(0.25)
    x = torch.randn(4, 1, 28, 28)
    before = packed(x)
    packed.train()
    optimizer = torch.optim.SGD([p for p in packed.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(packed(x), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    packed.eval()
    after = packed(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, packed.forward_layers(x), rtol=1e-4, atol=1e-5)


def test_inputs_the_program_was_not_compiled_for_take_the_checked_layer_path() -> None:
    packed = packed_model("cnn")
    packed.set_density(0.1)
    with pytest.raises((ValueError, RuntimeError), match="channels"):  # the dense stem's own error
        packed(torch.randn(1, 3, 28, 28))
    x = torch.randn(2, 1, 28, 28)
    wide = torch.randn(2, 1, 28, 56)[..., ::2]  # not contiguous
    torch.testing.assert_close(packed(wide), packed.forward_layers(wide.contiguous()), rtol=1e-4, atol=1e-5)
    compiled = packed.compiled(packed.level_of(0.1))
    assert compiled is not None and compiled.accepts(x) and not compiled.accepts(wide) and not compiled.accepts(x.double())


def _compiled(packed: PackedModel, x: torch.Tensor):
    packed(x)
    return packed.compiled(packed.net.active_level)


def test_a_program_cannot_reach_outside_its_slots() -> None:
    packed = packed_model("resnet8")
    packed.set_density(0.25)
    x = torch.randn(1, 3, 32, 32)
    compiled = _compiled(packed, x)
    out = torch.empty(1, 10)
    scratch = [torch.empty(s) for s in compiled.sizes]

    def slots(buffers: list[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([v for t in buffers for v in (t.data_ptr(), t.numel())], dtype=torch.int64)

    kernels.run_plan(compiled.records, slots([x, out, *scratch]), 1)  # as compiled: fine
    with pytest.raises(ValueError, match="past its slots"):
        kernels.run_plan(compiled.records, slots([x, out, *scratch]), 2)  # a batch of 2 in buffers for 1
    small = [torch.empty(s // 2) for s in compiled.sizes]
    with pytest.raises(ValueError, match="past its slots"):
        kernels.run_plan(compiled.records, slots([x, out, *small]), 1)
    bad = compiled.records.clone()
    bad[0, 2] = 99
    with pytest.raises(ValueError, match="slot 99"):
        kernels.run_plan(bad, slots([x, out, *scratch]), 1)
    bad = compiled.records.clone()
    bad[0, 0] = 42
    with pytest.raises(ValueError, match="unknown op"):
        kernels.run_plan(bad, slots([x, out, *scratch]), 1)
    bad = compiled.records.clone()
    bad[1, 1] = bad[1, 2]  # the second layer reads the slot it writes
    with pytest.raises(ValueError, match="over its own input"):
        kernels.run_plan(bad, slots([x, out, *scratch]), 1)
    with pytest.raises(ValueError, match=r"\[ops, 24\]"):
        kernels.run_plan(compiled.records.reshape(-1)[: 2 * FIELDS - 1], slots([x, out, *scratch]), 1)


def test_a_copy_compiles_its_own_forward() -> None:
    """A compiled forward points into its model's buffers: a deep copy must not share it."""
    import copy

    packed = packed_model("cnn")
    packed.set_density(0.25)
    x = torch.randn(2, 1, 28, 28)
    before = packed(x)
    twin = copy.deepcopy(packed)
    with torch.no_grad():
        for _, layer in twin.packed_layers():
            layer.values.mul_(2.0)
    twin.finalize()
    assert not torch.allclose(twin(x), before)
    torch.testing.assert_close(packed(x), before, rtol=0, atol=0)
    torch.testing.assert_close(twin(x), twin.forward_layers(x), rtol=1e-4, atol=1e-5)


def test_the_tuned_thread_count_changes_the_time_not_the_answer() -> None:
    packed = packed_model("resnet8")
    packed.set_density(0.5)
    x = torch.randn(1, 3, 32, 32)
    compiled = _compiled(packed, x)
    outs = []
    for threads in (1, 2):
        compiled.small_batch_threads = threads
        outs.append(packed(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_compile_prepares_every_density_before_the_first_request() -> None:
    packed = packed_model("cnn")
    packed.set_density(0.25)
    packed.compile()
    assert packed.compiled_indices == set(range(len(packed.densities))) and packed.active_density == 0.25
    x = torch.randn(1, 1, 28, 28)
    for density in packed.densities:
        packed.set_density(density)
        torch.testing.assert_close(packed(x), packed.forward_layers(x), rtol=1e-4, atol=1e-5)
