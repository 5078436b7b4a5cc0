"""Soft quantization on FSDP2 (`fully_shard`, DTensor) layers: 2 gloo processes on CPU.

Lightning's own FSDP strategy targets GPUs; torch's `fully_shard` runs on CPU with gloo,
so the sharded path of `WeightCoupler` is tested with it directly.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sq_lightning.coupler import WeightCoupler
from sq_lightning.ops.coupling import coupling_grad_batched


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        net = _net()
        fully_shard(net, mesh=init_device_mesh("cpu", (2,)))
        torch.manual_seed(1)
        x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))  # same batch on both ranks
        torch.nn.functional.cross_entropy(net(x), y).backward()
        before = {n: p.grad.full_tensor().clone() for n, p in net.named_parameters()}
        coupler = WeightCoupler(h=1e-2, w=0.3, backend="histogram")
        coupler.prepare(net)
        losses = coupler.add_gradients(net, compute_loss=True)
        added = {n: p.grad.full_tensor() - before[n] for n, p in net.named_parameters()}
        out[rank] = {"sigma": dict(coupler.sigma), "added": added, "loss": {k: float(v) for k, v in losses.items()}}
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_layers_get_the_whole_layer_gradient():
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    ref_net = _net()
    ref = WeightCoupler(h=1e-2, w=0.3, backend="histogram")
    ref.prepare(ref_net)
    names = list(ref.sigma)
    _, grads = coupling_grad_batched(
        [dict(ref_net.named_parameters())[n] for n in names], [ref.w_l(n) for n in names], [ref.h_l(n) for n in names]
    )
    for rank in (0, 1):
        got = out[rank]
        for n in names:
            assert abs(got["sigma"][n] - ref.sigma[n]) < 1e-6 * ref.sigma[n]
        for n, g in zip(names, grads):
            torch.testing.assert_close(got["added"][n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))
        assert torch.equal(got["added"]["0.bias"], torch.zeros(48))
        assert set(got["loss"]) == set(names)
