"""The gathered losses on 2 and 4 real processes equal one process on the concatenated batch.

Each spawned rank (gloo, CPU) runs the real CLIP under DistributedDataParallel
on its slice of a fixed batch, computes the loss with features gathered from
every rank, and steps backward so DDP averages the gradients. The parent then
builds the same model alone, runs the whole batch, and checks that the loss
and every parameter gradient agree on every rank. The same holds for
GradCache-style accumulation over micro-batches of one pair.
"""

from __future__ import annotations

import multiprocessing

import pytest
import torch
import torch.multiprocessing as mp
from distributed_workers import global_batch, gradients, loss_equivalence_worker, tiny_model

from clip_ray.loss import build_loss

pytestmark = pytest.mark.timeout(180)


def one_process_reference(loss_kind: str) -> tuple[float, dict[str, torch.Tensor]]:
    model = tiny_model(loss_kind)
    images, tokens = global_batch()
    loss = build_loss(loss_kind)(*model(images, tokens))
    loss.backward()
    return loss.item(), gradients(model)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def rank_results(request, tmp_path_factory):
    """Starts one job per world size; both losses and the checks run inside it.

    Ranks are forked from a forkserver that imported torch (and the _dynamo
    package DDP pulls in) once: spawning each rank from scratch costs ~5 s of
    imports per process on a small CPU machine.
    """
    world_size = request.param
    work = tmp_path_factory.mktemp(f"world{world_size}")
    multiprocessing.set_forkserver_preload(["distributed_workers", "torch._dynamo"])
    mp.start_processes(loss_equivalence_worker, args=(world_size, f"file://{work}/rendezvous", str(work)),
                       nprocs=world_size, join=True, start_method="forkserver")
    return [torch.load(work / f"rank{rank}.pt", weights_only=True) for rank in range(world_size)]


@pytest.mark.parametrize("loss_kind", ["clip", "siglip"])
@pytest.mark.parametrize("method", ["ddp", "gradcache"])
def test_gathered_loss_and_every_gradient_equal_one_process(rank_results, loss_kind, method):
    """ddp: one DDP step per rank. gradcache: micro-batches of one pair, accumulated by the GradCache recipe."""
    key = loss_kind if method == "ddp" else f"gradcache_{loss_kind}"
    ref_loss, ref_grads = one_process_reference(loss_kind)
    # Each rank's loss is the mean over its own rows; their mean is the whole batch's loss.
    rank_losses = [r[key]["loss"] for r in rank_results]
    assert sum(rank_losses) / len(rank_losses) == pytest.approx(ref_loss, rel=1e-12)
    assert len(set(rank_losses)) == len(rank_losses), "ranks should see different rows"

    assert all(g is not None and g.abs().sum() > 0 for g in ref_grads.values())
    for rank, result in enumerate(rank_results):
        grads = result[key]["grads"]
        assert grads.keys() == ref_grads.keys()
        for name, ref in ref_grads.items():
            torch.testing.assert_close(grads[name], ref, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"rank {rank}, {key}, {name}: {m}")


def test_without_gathering_the_gradients_differ(rank_results):
    """The control: scoring each slice alone is a smaller batch, so the comparison above has teeth."""
    _, ref_grads = one_process_reference("clip")
    local_grads = rank_results[0]["clip_local_only"]["grads"]
    worst = max(((local_grads[n] - g).abs().max() / g.abs().max()).item() for n, g in ref_grads.items())
    assert worst > 1e-2


def test_unequal_local_batches_raise_on_every_rank(rank_results):
    for result in rank_results:
        message = result["unequal_error"]
        assert message is not None and "same local batch on every rank" in message
        assert "rank 0: (3, 16)" in message and "rank 1: (2, 16)" in message
