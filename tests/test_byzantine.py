"""The Byzantine benchmark's attacker: the app it submits lies exactly on the chosen devices, and only there."""

from __future__ import annotations

import importlib.util
import tomllib

import pytest
import torch
from flwr.app import Context, RecordDict

from agent.client_app import train_subnet  # noqa: E402
from benchmarks.byzantine import app_with_liars  # noqa: E402
from contracts.messages import subnet_record, train_config, train_message, upload_state  # noqa: E402
from contracts.settings import RunSettings, build_run_model  # noqa: E402
from dress_model.packed import pack_checkpoint  # noqa: E402
from runtime.task_identity import task_identity  # noqa: E402


@pytest.fixture
def identity():
    with task_identity():  # as inside a Flower app
        yield


@pytest.fixture
def one_thread():
    """Bitwise-equal trainings: with several threads, how a busy machine splits the kernels' reductions changes
    the last bits of a sum."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_liars_reply_the_reversed_scaled_update_and_the_others_the_honest_one(tmp_path, identity, one_thread) -> None:
    app = app_with_liars(tmp_path / "app", devices=4, liars=2, scale=2.5, seed=0)
    assert tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]["clientapp"] \
        == "byzantine_client:app"
    spec = importlib.util.spec_from_file_location("byzantine_client", app / "byzantine_client.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    assert len(client.LIARS) == 2
    settings = RunSettings.defaults(width=4, max_examples=32)
    packed = pack_checkpoint(build_run_model(settings), max_density=0.25)
    sent = upload_state(packed)
    for partition in range(4):
        def message_and_context():
            message = train_message(5, subnet_record(packed), train_config(settings), 1, level=1)  # 0.25
            return message, Context(run_id=1, node_id=5, node_config={"partition-id": partition, "num-partitions": 4},
                                    state=RecordDict(), run_config=settings.to_run_config())
        honest = train_subnet(*message_and_context()).content["arrays"].to_torch_state_dict()
        replied = client.train(*message_and_context()).content["arrays"].to_torch_state_dict()
        assert replied.keys() == honest.keys()
        for key, value in honest.items():
            if partition in client.LIARS and value.is_floating_point() and not key.endswith(client.STATISTICS):
                torch.testing.assert_close(replied[key], sent[key] - 2.5 * (value - sent[key]))
            else:
                assert torch.equal(replied[key], value), key
        lied = any(not torch.equal(replied[k], honest[k]) for k in honest)
        assert lied == (partition in client.LIARS)
