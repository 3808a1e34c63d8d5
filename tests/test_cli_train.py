"""`dress-fleet train` / `evaluate` end to end on a real slice, and bad input with nothing half-written."""

import json

import pytest
from typer.testing import CliRunner

from cli.fleet import app

runner = CliRunner()


def test_train_then_evaluate(tmp_path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["train", "--out", str(out), "--densities", "1,0.25", "--epochs", "0.5", "--train-subset", "512",
         "--width", "4", "--loss-weights", "2,1"],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["density"] for r in metrics["densities"]] == [0.25, 1.0]
    assert all(0 <= r["accuracy"] <= 100 for r in metrics["densities"])
    result = runner.invoke(app, ["evaluate", str(out / "model.safetensors")])
    assert result.exit_code == 0, result.output
    for r in metrics["densities"]:
        assert f"{r['accuracy']:.2f}" in result.output  # evaluate reproduces the training-time numbers
    for flags, name in (([], "m.packed"), (["--half"], "m16.packed")):
        result = runner.invoke(app, ["pack", str(out / "model.safetensors"), str(out / name), *flags])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, ["infer", str(out / name), "--density", "0.25", "--batch", "4"])
        assert result.exit_code == 0 and "density 0.25" in result.output, result.output
    assert (out / "m16.packed").stat().st_size < 0.7 * (out / "m.packed").stat().st_size


@pytest.mark.parametrize(
    "args,message",
    [
        (["--densities", "0,0.5"], "(0, 1]"),
        (["--densities", "1.2"], "(0, 1]"),
        (["--densities", "0.5,1,0.25"], "sorted"),
        (["--densities", "1,0.5,0.5"], "repeat"),
        (["--dataset", "imagenet"], "unknown dataset"),
        (["--model", "vgg"], "unknown model"),
        (["--bn-affine", "group"], "unknown --bn-affine"),
        (["--loss-weights", "1,2"], "needs 4 values"),
        (["--loss-weights", "a,b,c,d"], "comma-separated numbers"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, args, message) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--out", str(out), "--epochs", "0.01", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_evaluate_rejects_a_corrupt_checkpoint(tmp_path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = runner.invoke(app, ["evaluate", str(bad)])
    assert result.exit_code == 2 and "not a DRESS checkpoint" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "does not exist" in result.output
