"""When the engine stages adapters ahead on a worker (`prefetch_pays`), and when it loads inline."""

from __future__ import annotations

import os

import pytest
import torch

from lorafold.server.engine.adapter_prefetch import prefetch_pays
from lorafold.server.engine.config import EngineConfig


def test_on_and_off_are_obeyed_everywhere() -> None:
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert prefetch_pays("on", device) is True
        assert prefetch_pays("off", device) is False


def test_auto_stages_ahead_on_a_gpu_and_on_a_cpu_only_with_a_core_to_spare() -> None:
    assert prefetch_pays("auto", torch.device("cuda"))
    cores = len(os.sched_getaffinity(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(cores)  # every core runs the forward: staging would take from it
        assert not prefetch_pays("auto", torch.device("cpu"))
        if cores > 1:
            torch.set_num_threads(cores - 1)
            assert prefetch_pays("auto", torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def test_bad_mode_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="adapter_prefetch must be auto, on or off"):
        EngineConfig(adapter_prefetch="sometimes")
