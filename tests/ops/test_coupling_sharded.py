"""The sharded histogram path (FSDP/DTensor layers) with 2 gloo processes.

Tested with torch.distributed directly: each rank holds an uneven slice of every
layer; the gradients it computes for its slice must equal the single-process
gradient of the whole layer at those positions.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sq_lightning.coupler import _all_reduce
from sq_lightning.ops.coupling import coupling_grad_batched


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, layers, cuts, ws, hs, out, poison):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        shards = [l[c[rank] : c[rank + 1]].clone() for l, c in zip(layers, cuts)]
        if poison and rank == 1:
            shards[0][0] = float("nan")
        try:
            loss, grads = coupling_grad_batched(shards, ws, hs, compute_loss=True, per_layer_loss=True, reduce=_all_reduce(None))
            out[rank] = {"grads": grads, "loss": loss}
        except ValueError as err:
            out[rank] = {"error": str(err)}
    finally:
        dist.destroy_process_group()


def _run(layers, cuts, ws, hs, poison=False):
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), layers, cuts, ws, hs, out, poison), nprocs=2, join=True)
    return dict(out)


def test_sharded_gradient_equals_whole_layer_gradient():
    torch.manual_seed(0)
    layers = [torch.randn(5000) * 0.1, torch.randn(777) * 2.0, torch.randn(64)]
    # Uneven cuts, and the third layer lives entirely on rank 0 (rank 1's shard is empty).
    cuts = [(0, 1234, 5000), (0, 700, 777), (0, 64, 64)]
    ws = [0.3 * float(l.std()) for l in layers]
    hs = [1e-3, 2e-3, 3e-3]
    ref_loss, ref = coupling_grad_batched(layers, ws, hs, compute_loss=True, per_layer_loss=True)
    out = _run(layers, cuts, ws, hs)
    for i, (layer, c) in enumerate(zip(layers, cuts)):
        got = torch.cat([out[0]["grads"][i], out[1]["grads"][i]])
        torch.testing.assert_close(got, ref[i], rtol=1e-4, atol=1e-6 * float(ref[i].abs().max()))
    for r in (0, 1):
        torch.testing.assert_close(out[r]["loss"], ref_loss, rtol=1e-4, atol=1e-6)


def test_non_finite_shard_fails_on_every_rank():
    layers = [torch.randn(100)]
    out = _run(layers, [(0, 50, 100)], [0.3], [1e-3], poison=True)
    for r in (0, 1):
        assert "non-finite" in out[r]["error"]
