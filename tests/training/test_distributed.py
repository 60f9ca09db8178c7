"""Two gloo processes on CPU give the same adapters as one process on the same global batches."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from lorafold.training.distributed import DistContext, all_reduce_grads, init_from_env, shard, shutdown
from tests.training.helpers import one_thread_fixture

STEPS, BATCH = 4, 6


_one_thread = one_thread_fixture()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(ctx: DistContext) -> dict[str, torch.Tensor]:
    from lorafold.training.subject.layer import subject_pairs
    from lorafold.training.subject.train import train_subjects
    from tests.training.test_subject_train import SUBJECTS, TARGETS, synthetic_rows, tiny_model

    torch.set_num_threads(1)
    model = tiny_model(torch.float64)
    # batch 6 of 24 rows: some global batches miss a subject, shards differ in subject mix
    train_subjects(model, synthetic_rows(), SUBJECTS, "scaled_adamw", rank=4, targets=TARGETS, steps=STEPS,
                   batch_size=BATCH, lr=1e-2, ctx=ctx)
    return {f"{p.name}.{w}": t.detach().clone() for p in subject_pairs(model) for w, t in (("A", p.A), ("B", p.B))}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    ctx = init_from_env(device="cpu", timeout_s=60)
    try:
        tensors = _train(ctx)
        if ctx.is_main:
            torch.save(tensors, out)
    finally:
        shutdown(ctx)


def test_shard_is_disjoint_and_covers() -> None:
    items = list(range(7))
    parts = [shard(items, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items


def test_all_reduce_grads_single_process_is_noop() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    all_reduce_grads([p], DistContext())
    assert p.grad is None


@pytest.mark.timeout(120)
def test_two_gloo_processes_match_one_process(tmp_path) -> None:
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    two = torch.load(out)
    one = _train(DistContext())
    assert two.keys() == one.keys()
    moved = 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-6, atol=1e-6)
        moved += int(k.endswith(".B") and bool(one[k].abs().sum() > 0))
    assert moved > 0
