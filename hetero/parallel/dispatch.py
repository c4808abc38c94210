"""Expert-parallel MoE at run time: token rows go to the ranks holding their experts and come back.

One call of a layer (every rank of the group calls it, in the same order, even with no tokens):
1. route: each (token, slot) pair picks a replica of its expert; a replicated expert's pairs on this
   rank are cut into contiguous blocks in proportion to the replicas' shares (deterministic);
2. dispatch: `all_to_all_single` of the per-destination counts, then of the pairs' rows and
   (destination, expert) ids, with uneven splits;
3. compute: this rank's experts only, through the oneDNN kernel (PackedMoe over the local experts);
4. combine: results retrace the hops backwards; each source weights them and sums per token.

Hierarchical (ranks_per_node = L), to cut inter-node traffic: a token crosses to each node that
holds any of its experts once, however many of them that node holds: first across nodes, to the
rank of the destination node with this rank's local index (one row per token and node), then
inside that node to the ranks holding the experts (one row per pair). On the way back the
forwarding rank weights and sums its node's results, so one row per token and node crosses back.
Each rank talks across nodes to N_nodes - 1 peers instead of W - L. `cross_node_rows` counts the
rows this rank sent to other nodes, both ways.

The exchange's sizes depend on the routing, so it runs inside one opaque op (`hetero.ep_moe`, a
fake kernel for tracing): eager collectives on a process group created with the option's timeout.
Gloo (CPU) exchanges host tensors; NCCL exchanges copies on the current CUDA device.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from hetero.backends.onednn.moe import PackedMoe
from hetero.compiler.binding import HANDLES
from hetero.compiler.errors import CollectiveError, ConfigError
from hetero.compiler.options import ExpertParallel
from hetero.ops import expert_weight, num_experts
from hetero.parallel.placement import Placement, uniform


class Groups:
    """The process groups one layer exchanges over, all created with the option's timeout."""

    def __init__(self, base: Any, timeout: float, ranks_per_node: int) -> None:
        self.ranks = (
            dist.get_process_group_ranks(base) if base is not None else list(range(dist.get_world_size()))
        )
        if self.ranks != sorted(self.ranks):
            raise ConfigError(f"expert_parallel: the group's ranks {self.ranks} must be ascending")
        self.size = len(self.ranks)
        self.rank = self.ranks.index(dist.get_rank())
        self.timeout = timeout
        self.backend = dist.get_backend(base)
        self.per_node = ranks_per_node
        self.node = self.rail = None
        try:
            self._create(datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as e:
            raise CollectiveError(
                f"[expert_parallel] rank {self.rank} of {self.size}: creating the process groups failed "
                f"(timeout {timeout:g} s): {str(e).splitlines()[0][:300]}. Every rank of the world must "
                "compile the model; likely another rank died or never got here"
            ) from e

    def _create(self, timeout: datetime.timedelta) -> None:
        # Every rank of the world creates every group, in the same order (new_group's contract).
        self.all = dist.new_group(self.ranks, timeout=timeout)
        per = self.per_node
        if per:
            nodes = [self.ranks[i : i + per] for i in range(0, self.size, per)]
            rails = [self.ranks[j::per] for j in range(per)]
            for ranks in nodes + rails:
                group = dist.new_group(ranks, timeout=timeout)
                if dist.get_rank() in ranks:
                    if ranks in nodes:
                        self.node = group
                    else:
                        self.rail = group

    def device(self) -> torch.device:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if self.backend == "nccl"
            else torch.device("cpu")
        )


_GROUPS: dict[tuple[Any, ...], Groups] = {}


def close_groups() -> None:
    """Destroy the process groups expert parallelism created (every rank calls it, before tearing down
    the default group): left to interpreter exit, gloo subgroups may abort the process as it ends."""
    for groups in _GROUPS.values():
        for group in (groups.node, groups.rail, groups.all):
            if group is not None:
                dist.destroy_process_group(group)
    _GROUPS.clear()


def groups_for(ep: ExpertParallel) -> Groups:
    key = (id(ep.group), ep.timeout, ep.hierarchical)
    if key not in _GROUPS:
        _GROUPS[key] = Groups(ep.group, ep.timeout, ep.hierarchical)
    return _GROUPS[key]


class _Hop:
    """One all_to_all_single: rows sorted by destination on the way out, restored on the way back."""

    def __init__(self, layer: ExpertParallelMoe, group: Any, size: int, dest: torch.Tensor) -> None:
        self.layer, self.group = layer, group
        self.order = torch.argsort(dest, stable=True)
        send = torch.bincount(dest, minlength=size)
        recv = torch.empty_like(send)
        layer.collective("exchange of counts", recv, send, None, None, group)
        self.send, self.recv = send.tolist(), recv.tolist()

    def forward(self, x: torch.Tensor, what: str) -> torch.Tensor:
        out = x.new_empty(sum(self.recv), *x.shape[1:])
        self.layer.collective(what, out, x[self.order].contiguous(), self.recv, self.send, self.group)
        return out

    def backward(self, y: torch.Tensor, what: str) -> torch.Tensor:
        back = y.new_empty(sum(self.send), *y.shape[1:])
        self.layer.collective(what, back, y.contiguous(), self.send, self.recv, self.group)
        out = torch.empty_like(back)
        out[self.order] = back
        return out


class ExpertParallelMoe:
    """One MoE layer's share of experts on this rank, and the exchange that feeds them."""

    def __init__(
        self,
        layer: str,
        gate: Sequence[torch.Tensor],
        up: Sequence[torch.Tensor],
        down: Sequence[torch.Tensor],
        dtype: str,
        ep: ExpertParallel,
        params: Sequence[torch.Tensor],
    ) -> None:
        self.layer = layer
        self.dtype = dtype
        self.groups = groups_for(ep)
        self.experts = num_experts(gate)
        self.inter, self.hidden = expert_weight(gate, 0).shape
        self.param_ids = {id(p) for p in params}  # to find the layers of a model (hetero.parallel.layers)
        placement = ep.placement
        if isinstance(placement, str):
            placement = uniform(self.experts, self.groups.size)
        self._check(placement)
        self.placement = placement
        # A plain copy of this rank's experts: the source when a new placement moves them to other ranks.
        with torch.no_grad():
            self.shard = {
                e: tuple(expert_weight(w, e).detach().to("cpu").clone() for w in (gate, up, down))
                for e in placement.experts_of(self.groups.rank)
            }
        self.counts = torch.zeros(self.experts, dtype=torch.long)  # routed here from this rank's tokens
        self.computed = 0  # pairs this rank's experts computed, all calls
        self.cross_node_rows = 0  # rows this rank sent to other nodes (hierarchical), all calls
        self.cross_node_pairs = 0  # what a flat exchange would have sent across nodes for the same calls
        self._repack()

    # -- placement -------------------------------------------------------------------------------

    def _check(self, placement: Placement) -> None:
        if not isinstance(placement, Placement):
            raise ConfigError(
                f"expert_parallel: a placement must be a hetero.parallel.Placement, got {placement!r}"
            )
        if placement.experts != self.experts or placement.ranks != self.groups.size:
            raise ConfigError(
                f"expert_parallel: layer {self.layer} has {self.experts} experts on {self.groups.size} "
                "ranks; "
                f"the placement is for {placement.experts} experts on {placement.ranks} ranks"
            )

    def _repack(self) -> None:
        local = sorted(self.shard)
        self.local_index = torch.full((self.experts,), -1, dtype=torch.long)
        self.local_index[local] = torch.arange(len(local))
        self.kernel = (
            PackedMoe(*([self.shard[e][i] for e in local] for i in range(3)), self.dtype) if local else None
        )
        owner = torch.tensor([held[0] for held in self.placement.replicas])
        self.owner = owner
        self.split = [
            (e, torch.tensor(held), torch.tensor(list(itertools.accumulate(share))))
            for e, (held, share) in enumerate(
                zip(self.placement.replicas, self.placement.shares, strict=True)
            )
            if len(held) > 1
        ]

    def set_placement(self, placement: Placement) -> None:
        """Move experts to match `placement` (a collective: every rank calls it with the same placement)."""
        self._check(placement)
        rank, size, old = self.groups.rank, self.groups.size, self.placement
        digest = torch.tensor([hash((placement.replicas, placement.shares)) % (1 << 62)] * 2)
        digest[1] = -digest[1]
        self.collective("placement agreement", None, digest, None, None, self.groups.all, reduce="max")
        if digest[0] != -digest[1]:
            raise CollectiveError(
                f"[expert_parallel] layer {self.layer}, rank {rank}: the ranks passed different placements "
                "to set_placement; compute it once from all-reduced counts (hetero.parallel.routing_counts)"
            )

        def moves(src: int, dst: int) -> list[int]:
            # Experts dst gains and src sends: src is the lowest rank that held them before.
            return [
                e
                for e in placement.experts_of(dst)
                if dst not in old.replicas[e] and old.replicas[e][0] == src
            ]

        width = 3 * self.inter * self.hidden
        sample = next(iter(self.shard.values()))[0] if self.shard else torch.empty(0)
        sends = [moves(rank, d) for d in range(size)]
        recvs = [moves(s, rank) for s in range(size)]
        rows = [torch.cat([t.reshape(-1) for t in self.shard[e]]) for d in sends for e in d]
        send = torch.stack(rows) if rows else torch.empty(0, width, dtype=sample.dtype)
        recv = send.new_empty(sum(map(len, recvs)), width)
        self.collective(
            "expert weight exchange",
            recv,
            send,
            [len(r) for r in recvs],
            [len(s) for s in sends],
            self.groups.all,
        )
        got = dict(zip([e for r in recvs for e in r], recv, strict=True))
        keep = set(placement.experts_of(rank))
        shard = {e: w for e, w in self.shard.items() if e in keep}
        for e, flat in got.items():
            n = self.inter * self.hidden
            shard[e] = (
                flat[:n].view(self.inter, self.hidden).clone(),
                flat[n : 2 * n].view(self.inter, self.hidden).clone(),
                flat[2 * n :].view(self.hidden, self.inter).clone(),
            )
        self.shard, self.placement = shard, placement
        self._repack()

    # -- a call ----------------------------------------------------------------------------------

    def collective(
        self,
        what: str,
        out: torch.Tensor | None,
        inp: torch.Tensor,
        out_splits: list[int] | None,
        in_splits: list[int] | None,
        group: Any,
        reduce: str | None = None,
    ) -> None:
        """all_to_all_single(out, inp, splits) over group, or with reduce="sum"|"max" an all_reduce of inp;
        any failure becomes a CollectiveError naming the layer, the rank and the timeout."""
        device = self.groups.device()
        try:
            if reduce:
                moved = inp.to(device)
                op = dist.ReduceOp.SUM if reduce == "sum" else dist.ReduceOp.MAX
                dist.all_reduce(moved, op=op, group=group)
                inp.copy_(moved)
                return
            if device.type == "cpu":
                dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
            else:
                moved = out.to(device)
                dist.all_to_all_single(moved, inp.to(device), out_splits, in_splits, group=group)
                out.copy_(moved)
        except (RuntimeError, ValueError) as e:
            raise CollectiveError(
                f"[expert_parallel] layer {self.layer}, rank {self.groups.rank} of {self.groups.size}: "
                f"{what} failed (timeout {self.groups.timeout:g} s): {str(e).splitlines()[0][:300]}. "
                "Likely cause: another rank died, timed out, or diverged (ran other layers or calls). "
                "hint: options={'expert_parallel': {'timeout': SECONDS}}"
            ) from e

    def _destinations(self, experts: torch.Tensor) -> torch.Tensor:
        dest = self.owner[experts]
        for e, held, bounds in self.split:
            pos = (experts == e).nonzero().squeeze(1)
            if pos.numel():
                cut = torch.round(bounds * pos.numel()).long()
                dest[pos] = held[
                    torch.searchsorted(cut, torch.arange(pos.numel()), right=True).clamp_max(len(held) - 1)
                ]
        return dest

    def __call__(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        flat = topk_ids.reshape(-1).long()
        pairs = ((flat >= 0) & (flat < self.experts)).nonzero().squeeze(1)
        experts = flat[pairs]
        self.counts += torch.bincount(experts, minlength=self.experts)
        tokens = pairs // topk_ids.shape[-1]
        dest = self._destinations(experts)
        weights = topk_weights.reshape(-1)[pairs].float()
        out = torch.zeros(hidden.shape[0], self.hidden, dtype=torch.float32)
        if self.groups.per_node:
            return self._two_level(hidden, tokens, dest, experts, weights, out)
        hop = _Hop(self, self.groups.all, self.groups.size, dest)
        rows = hop.forward(hidden.index_select(0, tokens), "dispatch")
        ids = hop.forward(experts, "dispatch ids")
        y = hop.backward(self._compute(rows, ids), "combine")
        return out.index_add_(0, tokens, y.float() * weights[:, None]).to(hidden.dtype)

    def _two_level(
        self,
        hidden: torch.Tensor,
        tokens: torch.Tensor,
        dest: torch.Tensor,
        experts: torch.Tensor,
        weights: torch.Tensor,
        out: torch.Tensor,
    ) -> torch.Tensor:
        per = self.groups.per_node
        nodes = self.groups.size // per
        node = dest // per
        # One row per (token, destination node); each pair remembers which row carries it.
        rows_key, row_of_pair = torch.unique(tokens * nodes + node, return_inverse=True)
        row_token, row_node = rows_key // nodes, rows_key % nodes
        across = _Hop(self, self.groups.rail, nodes, row_node)
        rows = across.forward(hidden.index_select(0, row_token), "dispatch across nodes")
        # The pairs follow their rows: same destination node, and the row's place among those sent there.
        place = torch.empty_like(row_of_pair)
        place[across.order] = torch.arange(across.order.numel())
        start = torch.tensor([0, *itertools.accumulate(across.send)][:-1], dtype=torch.long)
        local_row = place[row_of_pair] - start[row_node[row_of_pair]]
        follow = _Hop(self, self.groups.rail, nodes, node)
        meta = follow.forward(
            torch.stack([local_row, dest % per, experts], dim=1), "dispatch ids across nodes"
        )
        pair_weights = follow.forward(weights, "dispatch weights across nodes")
        # Received pair -> the received row it reads: rows from source s start at that source's offset.
        got_from = torch.repeat_interleave(torch.arange(nodes), torch.tensor(follow.recv))
        offsets = torch.tensor([0, *itertools.accumulate(across.recv)][:-1], dtype=torch.long)
        row = offsets[got_from] + meta[:, 0]
        inside = _Hop(self, self.groups.node, per, meta[:, 1])
        pair_rows = inside.forward(rows.index_select(0, row), "dispatch in node")
        pair_experts = inside.forward(meta[:, 2].contiguous(), "dispatch ids in node")
        y = inside.backward(self._compute(pair_rows, pair_experts), "combine in node")
        summed = torch.zeros(rows.shape[0], self.hidden, dtype=torch.float32)
        summed.index_add_(0, row, y.float() * pair_weights[:, None])
        back = across.backward(summed, "combine across nodes")
        me = self.groups.rank // per
        self.cross_node_rows += 2 * int((row_node != me).sum())
        self.cross_node_pairs += 2 * int((node != me).sum())
        return out.index_add_(0, row_token, back).to(hidden.dtype)

    def _compute(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        self.computed += rows.shape[0]
        if rows.shape[0] == 0:
            return rows.new_empty(0, self.hidden)
        local = self.local_index[experts]
        if self.kernel is None or bool((local < 0).any()):
            missing = sorted(set(experts[local < 0].tolist()))
            raise CollectiveError(
                f"[expert_parallel] layer {self.layer}, rank {self.groups.rank}: received tokens for experts "
                f"{missing[:8]} it does not hold; the ranks' placements diverged (call set_placement on "
                "every rank)"
            )
        return self.kernel(rows, local[:, None], torch.ones(rows.shape[0], 1, dtype=torch.float32))


def live_layers() -> list[ExpertParallelMoe]:
    return HANDLES.live(ExpertParallelMoe)


@torch.library.impl("hetero::ep_moe", "CPU")
def _ep_moe(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.ep_moe")(hidden, topk_ids, topk_weights)
