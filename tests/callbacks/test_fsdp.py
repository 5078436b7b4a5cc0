"""The methods on FSDP2 (`fully_shard`, DTensor) layers: 2 gloo processes on CPU.

Lightning's FSDP (FSDP1) strategy targets GPUs and is refused by the callbacks; torch's
`fully_shard` runs on CPU with gloo, so the sharded paths of `WeightCoupler`,
`ClusterSnapper` and `LearnedCodebook` are tested here with it directly, against the
same object on an unsharded copy. `test_distributed.py` runs the callbacks through
Lightning's `ModelParallelStrategy`.
"""

import contextlib
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sq_lightning.coupler import WeightCoupler
from sq_lightning.ops.coupling import coupling_exact, coupling_grad_batched


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _process_group(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _two_ranks(worker):
    """``{rank: what worker(rank, port, out) stored}`` from 2 spawned gloo processes."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(_free_port(), out), nprocs=2, join=True)
    return dict(out)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))


def _worker(rank, port, out):
    with _process_group(rank, port):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        net = _net()
        fully_shard(net, mesh=init_device_mesh("cpu", (2,)))
        torch.manual_seed(1)
        x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))  # same batch on both ranks
        results = {}
        for backend in ("histogram", "auto"):  # "auto": both layers are small enough to be exact
            for p in net.parameters():
                p.grad = None
            torch.nn.functional.cross_entropy(net(x), y).backward()
            before = {n: p.grad.full_tensor().clone() for n, p in net.named_parameters()}
            coupler = WeightCoupler(h=1e-2, w=0.3, backend=backend)
            coupler.prepare(net)
            losses = coupler.add_gradients(net, compute_loss=True)
            added = {n: p.grad.full_tensor() - before[n] for n, p in net.named_parameters()}
            results[backend] = {"sigma": dict(coupler.sigma), "added": added, "loss": {k: float(v) for k, v in losses.items()}}
        out[rank] = results


@pytest.mark.parametrize("make", ["soft", "refine", "codebook"])
def test_fsdp1_strategy_is_refused_at_setup_with_the_fsdp2_fix(make):
    from lightning.pytorch.strategies import FSDPStrategy

    from sq_lightning.callbacks import ClusterRefine, SoftQuantCallback
    from sq_lightning.callbacks.learned_codebook import LearnedCodebook

    callback = {"soft": SoftQuantCallback, "refine": ClusterRefine, "codebook": LearnedCodebook}[make]()
    # Lightning's FSDP strategy needs GPUs to run; the check reads only the strategy's type.
    trainer_like = type("T", (), {"strategy": FSDPStrategy(), "max_epochs": 3, "callbacks": [], "is_global_zero": True})()
    with pytest.raises(ValueError, match=r"does not support `FSDPStrategy` \(FSDP1\).*ModelParallelStrategy.*fully_shard"):
        callback.setup(trainer_like, _net(), "fit")


def test_fsdp2_sharded_layers_get_the_whole_layer_gradient():
    out = _two_ranks(_worker)
    for backend in ("histogram", "auto"):
        ref_net = _net()
        ref = WeightCoupler(h=1e-2, w=0.3, backend=backend)
        ref.prepare(ref_net)
        names = list(ref.sigma)
        params = dict(ref_net.named_parameters())
        if backend == "histogram":  # the batched op itself, independent of the coupler
            _, grads = coupling_grad_batched([params[n] for n in names], [ref.w_l(n) for n in names], [ref.h_l(n) for n in names])
        else:
            grads = [coupling_exact(params[n], ref.w_l(n), ref.h_l(n)).grad for n in names]
        for rank in (0, 1):
            got = out[rank][backend]
            for n in names:
                assert abs(got["sigma"][n] - ref.sigma[n]) < 1e-6 * ref.sigma[n]
            for n, g in zip(names, grads):
                torch.testing.assert_close(got["added"][n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=f"{n}, {backend}")
            assert torch.equal(got["added"]["0.bias"], torch.zeros(48))
            assert set(got["loss"]) == set(names)


# -- ClusterSnapper and LearnedCodebook on sharded layers ------------------------------------
#
# The reference is the same object on an unsharded copy of the model, on every rank.
# 47 rows split 24 + 23 (uneven), and the last layer's single row leaves rank 1 an
# empty slice.


def _uneven_net():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(64, 47), torch.nn.ReLU(), torch.nn.Linear(47, 10), torch.nn.ReLU(), torch.nn.Linear(10, 1))


def _sharded(net):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    for m in net:
        if isinstance(m, torch.nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _local_of(p, whole):
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, p.device_mesh, p.placements).to_local()


def _full(net):
    return {n: p.detach().full_tensor().clone() for n, p in net.named_parameters()}


# Fixed assignments, moving ones, and a gradual snap that reaches its exact tie at the fourth tie.
_SNAP_MODES = {"fixed": {}, "reassign": {"reassign": True}, "ramp": {"ramp_steps": 3, "ramp_from": 0.1}}


def _snapper_worker(rank, port, out):
    from sq_lightning.snapper import ClusterSnapper

    with _process_group(rank, port):
        results = {}
        for mode, extra in _SNAP_MODES.items():
            from sq_lightning.config import RefineConfig, SnapConfig

            kwargs = dict(snap=SnapConfig(max_bits=2, on_unclustered="snap"), refine=RefineConfig(**extra))
            ref, net = _uneven_net(), _sharded(_uneven_net())
            ref_snap, snap = ClusterSnapper(**kwargs), ClusterSnapper(**kwargs)
            errors = ({n: r.snap_error for n, r in snap.snap(net).items()}, {n: r.snap_error for n, r in ref_snap.snap(ref).items()})
            steps = {"snap": (_full(net), {n: p.detach().clone() for n, p in ref.named_parameters()})}
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for step in range(4):
                    if step == 2:  # resume from the (gathered, whole-layer) state
                        state = snap.state_dict()
                        snap = ClusterSnapper(**kwargs)
                        snap.load_state_dict(state)
                    # An optimizer step of about a third of each layer's spread: with 4 levels, weights cross.
                    for (_, r), (_, p) in zip(ref.named_parameters(), net.named_parameters()):
                        d = torch.randn(r.shape, generator=g) * 0.3 * float(r.std(correction=0))
                        r.add_(d)
                        p.to_local().add_(_local_of(p, d))
                    ref_snap.tie(ref)
                    snap.tie(net)
                    steps[step] = (_full(net), {n: p.detach().clone() for n, p in ref.named_parameters()})
            results[mode] = {
                "steps": steps,
                "snap_errors": errors,
                "clusters": (snap.export_clusters(), ref_snap.export_clusters()),
                "counts": ({n: c.counts.cpu() for n, c in snap.clusters.items()}, {n: c.counts for n, c in ref_snap.clusters.items()}),
                "state": (snap.state_dict(), ref_snap.state_dict()),
            }
        out[rank] = results


def test_sharded_tie_reassignment_and_gradual_snap_equal_one_process():
    out = _two_ranks(_snapper_worker)
    for rank in (0, 1):
        for mode in _SNAP_MODES:
            got = out[rank][mode]
            reassign = mode == "reassign"
            for step, (sharded, ref) in got["steps"].items():
                for n in ref:
                    torch.testing.assert_close(sharded[n], ref[n], rtol=1e-6, atol=1e-7, msg=f"{n} at {step}, {mode}")
                    if mode == "ramp" and n.endswith("weight") and step in ("snap", 0, 1, 2):  # not yet at the cluster values
                        assert torch.unique(sharded[n]).numel() > 4, (n, step)
            errors, ref_errors = got["snap_errors"]
            assert set(errors) == set(ref_errors) and all(e > 0.01 for e in ref_errors.values())
            for n in ref_errors:  # from the slices with one all-reduce, the whole layer's error
                assert errors[n] == pytest.approx(ref_errors[n], rel=1e-9), n
            sharded_cl, ref_cl = got["clusters"]
            assert set(sharded_cl) == set(ref_cl) == {"0.weight", "2.weight", "4.weight"}
            for n in ref_cl:
                torch.testing.assert_close(sharded_cl[n][0], ref_cl[n][0], rtol=1e-6, atol=1e-7)
                assert torch.equal(sharded_cl[n][1], ref_cl[n][1]), n
                assert torch.equal(got["counts"][0][n], got["counts"][1][n])
                # The tied weights take exactly their cluster's value.
                assert torch.equal(got["steps"][3][0][n], sharded_cl[n][0][sharded_cl[n][1]])
            state, ref_state = got["state"]
            for n in ref_state["clusters"]:
                assert torch.equal(state["clusters"][n]["assignments"], ref_state["clusters"][n]["assignments"])
            if reassign:
                for n in ref_state["latent"]:
                    torch.testing.assert_close(state["latent"][n], ref_state["latent"][n], rtol=1e-6, atol=1e-7)
    # Weights did change cluster, so the reassigned path was exercised.
    moved = out[0]["reassign"]["clusters"][0]["0.weight"][1]
    first = out[0]["fixed"]["clusters"][0]["0.weight"][1]
    assert int((moved != first).sum()) > 50


def _codebook_worker(rank, port, out):
    from torch.distributed.tensor import distribute_tensor

    from sq_lightning.callbacks.learned_codebook import LearnedCodebook

    with _process_group(rank, port):
        results = {}
        for temperature in (0.0, 0.05):
            net = _sharded(_uneven_net())
            # SGD on the codebooks: Adam divides by the gradient's size, and at a k-means init the
            # codebook gradient is a sum that cancels to nearly zero, where summation order shows.
            kwargs = dict(lam=5.0, bits=2, temperature=temperature, codebook_lr=1.0, codebook_optimizer="sgd")
            cb = LearnedCodebook(**kwargs)
            init = (cb.init_codebooks(net), LearnedCodebook(**kwargs).init_codebooks(_uneven_net()))
            g = torch.Generator().manual_seed(7)
            steps = []
            for _ in range(3):
                # The reference takes this step from the sharded run's state (weights, codebooks,
                # Adam moments), so that the comparison is of one step, not of two trajectories.
                ref = _uneven_net()
                with torch.no_grad():
                    for n, r in ref.named_parameters():
                        r.copy_(dict(net.named_parameters())[n].full_tensor())
                ref_cb = LearnedCodebook(**kwargs)
                ref_cb.load_state_dict(cb.state_dict())
                ref_cb.prepare(ref)
                for (_, r), (_, p) in zip(ref.named_parameters(), net.named_parameters()):
                    task = torch.randn(r.shape, generator=g) * 1e-2
                    r.grad = task.clone()
                    p.grad = distribute_tensor(task.clone(), p.device_mesh, p.placements)
                value, ref_value = float(cb.step(net)), float(ref_cb.step(ref))
                steps.append(
                    {
                        "values": (value, ref_value),
                        "grads": ({n: p.grad.full_tensor() for n, p in net.named_parameters()}, {n: r.grad.clone() for n, r in ref.named_parameters()}),
                        "codebooks": (cb.codebooks(), ref_cb.codebooks()),
                    }
                )
                with torch.no_grad():  # the model's own SGD step
                    for p in net.parameters():
                        p.to_local().sub_(0.1 * p.grad.to_local())
            ref = _uneven_net()
            with torch.no_grad():
                for n, r in ref.named_parameters():
                    r.copy_(dict(net.named_parameters())[n].full_tensor())
            ref_snapped = {n: a for n, (_, a) in cb.snap(ref).items()}  # plain tensors: the one-process rule
            snapped = cb.snap(net)
            results[temperature] = {
                "init": init,
                "steps": steps,
                "snapped": ({n: a for n, (_, a) in snapped.items()}, ref_snapped),
                "weights": (_full(net), {n: p.detach().clone() for n, p in ref.named_parameters()}),
            }
        out[rank] = results


def test_sharded_learned_codebook_steps_like_one_process():
    out = _two_ranks(_codebook_worker)
    for rank in (0, 1):
        for temperature, got in out[rank].items():
            books0, ref_books0 = got["init"]
            for n in ref_books0:  # built from the gathered layer: the one-process codebooks
                assert torch.equal(books0[n], ref_books0[n]), n
            for step in got["steps"]:
                value, ref_value = step["values"]
                assert value == pytest.approx(ref_value, rel=1e-5)
                sharded, ref = step["grads"]
                for n in ref:
                    torch.testing.assert_close(sharded[n], ref[n], rtol=1e-5, atol=1e-8, msg=f"{n}, temperature {temperature}")
                books, ref_books = step["codebooks"]
                assert set(books) == set(ref_books) == {"0.weight", "2.weight", "4.weight"}
                for n in ref_books:
                    torch.testing.assert_close(books[n], ref_books[n], rtol=1e-5, atol=1e-8)
                    assert torch.equal(books[n], out[1 - rank][temperature]["steps"][len(got["steps"]) - 1]["codebooks"][0][n]) or step is not got["steps"][-1]
            assignments, ref_assignments = got["snapped"]
            weights, ref_weights = got["weights"]
            for n in ref_assignments:
                assert torch.equal(assignments[n], ref_assignments[n]), n
                torch.testing.assert_close(weights[n], ref_weights[n], rtol=0, atol=0)
