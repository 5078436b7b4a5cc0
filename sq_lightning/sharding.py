"""Layers sharded across ranks as DTensors (FSDP2, ``fully_shard``).

Under Lightning's ``ModelParallelStrategy`` (or torch's ``fully_shard`` directly) each
rank holds a slice of every layer: ``p.to_local()``, dimension 0 split across one mesh
dimension (``Shard(0)``). What the methods need from a whole layer is additive (a
histogram, per-cluster sums and counts, moments), so each rank computes it on its
slice and one all-reduce over the shard group gives every rank the whole layer's
value; per-weight work (a snap, a tie, a gradient) then stays on the local slice.
One-time work that needs the whole layer in one place (finding clusters at the snap)
gathers it with ``full_tensor()``.

Every function here is a collective where it says so: all ranks of the shard group
must call it, for the same layers in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardSpec", "all_reduce_sum", "is_sharded", "shard_group", "shard_spec"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a sharded or replicated layer of FSDP2 / tensor parallelism)."""
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def shard_group(t: Tensor, name: str = "parameter") -> "dist.ProcessGroup":
    """The process group over which the DTensor ``t`` is sharded.

    Raises:
        NotImplementedError: ``t`` is laid out other than FSDP2's: sharded (``Shard``)
            over a one-dimensional mesh.
    """
    mesh, placements = t.device_mesh, tuple(t.placements)
    if mesh.ndim != 1 or not placements[0].is_shard():
        raise NotImplementedError(
            f"`{name}` is a DTensor with placements {placements} on a {mesh.ndim}-D device mesh; sq_lightning "
            "supports layers sharded over one mesh dimension, as FSDP2 lays them out "
            "(`fully_shard(module, mesh=self.device_mesh['data_parallel'])`). Exclude the layer or shard it so."
        )
    return mesh.get_group()


@dataclass(frozen=True)
class ShardSpec:
    """How one layer is laid out across ranks: enough to slice a whole-layer tensor
    (cluster assignments, latent weights) like the layer, and to gather one back."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]
    group: object

    def local(self, full: Tensor) -> Tensor:
        """This rank's slice of ``full`` (the whole layer's shape, or flat): no communication
        (on torch < 2.6 a scatter from rank 0: a collective)."""
        from torch.distributed.tensor import distribute_tensor

        whole = full.reshape(self.shape)
        try:
            return distribute_tensor(whole, self.mesh, list(self.placements), src_data_rank=None).to_local()
        except TypeError:  # torch < 2.6: no `src_data_rank`; rank 0's copy is scattered (every rank holds the same)
            return distribute_tensor(whole, self.mesh, list(self.placements)).to_local()

    def gather(self, local: Tensor) -> Tensor:
        """The whole layer from every rank's slice ``local`` (collective)."""
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(local, self.mesh, list(self.placements), shape=self.shape, stride=self.stride).full_tensor()


def shard_spec(t: Tensor, name: str = "parameter") -> ShardSpec:
    """The :class:`ShardSpec` of the DTensor ``t`` (see :func:`shard_group` for what is supported)."""
    group = shard_group(t, name)
    return ShardSpec(t.device_mesh, tuple(t.placements), t.shape, tuple(t.stride()), group)


def all_reduce_sum(tensors: list[Tensor], group: "dist.ProcessGroup") -> list[Tensor]:
    """Sums each tensor over ``group`` with one all-reduce (collective). float64 in, float64 out:
    counts up to 2^53 and sums of float32 values stay exact enough to match one process."""
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    return list(flat.split([t.numel() for t in tensors]))
