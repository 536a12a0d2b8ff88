"""Full training on Ray Train workers (DDP over gloo on CPU here, one process per GPU on a
cluster): two workers make the steps one process makes with the same global batch, a run
resumes under another number of workers, and a worker's mistake is one line."""
import pytest
import torch

from ppsearch.checkpoint import load_base
from ppsearch.config import load_trainer
from ppsearch.train import TrainError, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray for the module (a run given an address leaves that Ray running)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _trainer(out, *overrides):
    return load_trainer("pretrain_tiny", ["model=T/2", "schedule=4x4@0.5,2x2", "batch_size=8", "progress=false",
                                          "log_every=1", "threads=1", f"out_dir={out}", *overrides])


def _max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _weights(out):
    """The EMA weights and the trained weights a run left in ``out``."""
    return (load_base(out / "model.safetensors").state_dict(),
            torch.load(out / "train_state.pt", weights_only=True)["model"])


def test_two_workers_equal_one_process_and_resume_on_another_count(tmp_path, ray_address):
    lines = []
    two = train(_trainer(tmp_path / "two", "steps=3", "num_workers=2", f"ray_address={ray_address}"), log=lines.append)
    one = train(_trainer(tmp_path / "one", "steps=3"))
    assert two.steps == 3 and two.model is None and [s for s, _ in two.losses] == [1, 2, 3]
    assert [line.split(" loss")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]  # rank 0's, once
    for a, b in zip(_weights(tmp_path / "two"), _weights(tmp_path / "one")):
        assert _max_difference(a, b) < 1e-5
    torch.testing.assert_close(torch.tensor(two.losses), torch.tensor(one.losses), atol=1e-5, rtol=0)
    # The two workers' run goes on in one process (and the other way round) to the same weights.
    train(_trainer(tmp_path / "two", "steps=5"))
    train(_trainer(tmp_path / "one", "steps=5", "num_workers=2", "accumulation=2", f"ray_address={ray_address}"))
    for a, b in zip(_weights(tmp_path / "two"), _weights(tmp_path / "one")):
        assert _max_difference(a, b) < 1e-5
    # Another training's folder is refused by the workers, in one line.
    with pytest.raises(TrainError, match=r"holds a training with other settings \(lr\)"):
        train(_trainer(tmp_path / "one", "steps=6", "lr=0.5", "num_workers=2", f"ray_address={ray_address}"))
