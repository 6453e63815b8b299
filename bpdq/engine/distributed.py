"""One run spread over the processes of a ``torch.distributed`` group (``torchrun``; gloo on CPU, nccl with CUDA).

The run is the same loop on every rank (:mod:`bpdq.engine.loop`), with these differences:

- **Calibration.** Every rank makes the same token windows and batches; rank ``r`` of ``N`` keeps a
  contiguous share of the batches (:func:`shard`; there must be at least ``N`` batches) and runs its own
  share through each layer, for the Hessians and for the next layer's inputs.
- **Hessians.** Each rank accumulates ``sum x x^T`` and the sample count over its batches; the sums are
  reduced in float64 onto the rank that solves the linear (:func:`reduce_hessians`: one status exchange per
  sequential group, asynchronous reductions), so that the owner holds the whole Hessian and the other
  ranks none. A Hessian
  is a float64 sum of per-batch float32 terms in one process too
  (:class:`~bpdq.solvers.hessian.HessianAccumulator`), so grouping the batches by rank changes only its last
  float64 bits and the float32 Hessian the solver receives is the same: the distributed checkpoint is
  byte-identical to the single-process one (at the same thread count per process; tested in
  tests/engine/test_distributed.py).
- **Solves.** Each linear of a sequential group has an owner rank (:func:`owners`: largest weight first, to
  the least-loaded rank); the owners solve their linears at the same time, then each owner broadcasts its
  QuantLinear (packed planes, coefficients, and its record and metadata as JSON: :func:`share_linear`) and
  the other ranks swap it in. Groups are solved one after another (each one's Hessians need the previous
  ones quantized), so the solves run in parallel within a group only: q/k/v and gate/up in a Llama layer.
  A linear alone in its group (o_proj, down_proj) and the output projection are split by rows instead when
  their solver allows it: every rank gets the whole Hessian, solves its contiguous share of the rows
  (:func:`row_share`), and the packed shares travel to every rank (:func:`gather_rows`). GPTQ's rows are
  independent (``Solver.rows_independent``); BPDQ's groups keep the iterate whose error summed over all rows
  is the smallest, so each rank gathers every row's error of each iterate from the others
  (``Solver.rows_gathered``, :func:`row_values`) and all decide alike. Either way the bytes are those of
  one process. With asymmetric
  calibration such a linear needs two factorisations of its Hessian (its targets' and its solver's,
  :meth:`~bpdq.solvers.base.Solver.prefactor`): one rank makes each and sends it to the others
  (:func:`spread`). Otherwise (a solver that allows neither) o_proj and down_proj are solved by their
  owner while the others wait, and the output projection by rank 0.
- **Output.** Rank 0 writes the checkpoint and the report; the others write nothing (their resume inputs
  excepted: each rank saves its own share of the next layer's inputs under their global batch numbers, so
  the state directory must be on a filesystem all ranks share).
- **Failures.** Every collective of the run is preceded by a status exchange (:func:`agree`). A rank that
  fails joins the next exchange with its exit code (:func:`fail`, called by the run and the CLI on any
  exception); the others raise :class:`PeerFailed` carrying that code there. So an error on one rank is
  reported once (by that rank), ends every rank, and every rank exits with the same code, without waiting
  for a timeout. A stop requested by a signal on any rank stops every rank at the same layer boundary.
  The collectives still carry a timeout (:data:`TIMEOUT`, set when the CLI creates the group) for a rank
  that dies without a word (SIGKILL, a lost node).

A mixture of experts' experts are solved in rounds of one expert per rank, each Hessian reduced onto its
expert's rank and each quantized projection sent to every rank (:func:`share_weight`; see
:func:`bpdq.engine.moe.solve_experts`). Asymmetric calibration runs as the rest: each rank carries its share of the full-precision stream, and the
cross moments are reduced with the Hessians onto the ranks that solve their linears (:func:`reduce_hessians`).
Not supported with several processes (refused with a ``ValueError`` before any work): the quality stages
``tuning`` and ``target_bpw``.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
from dataclasses import asdict
from typing import Any, Callable, Collection, Sequence, TypeVar

import torch
from torch import nn

from bpdq.engine.interrupt import RunInterrupted
from bpdq.linear import QuantLinear
from bpdq.quantized import QuantizedWeight, SolveStats
from bpdq.report import ModuleRecord
from bpdq.solvers.base import relative_loss
from bpdq.solvers.asymmetric import AsymmetricAccumulator
from bpdq.solvers.hessian import HessianAccumulator
from bpdq.solvers.sweep import SweepFactor

logger = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer ends the run (a silent rank)
T = TypeVar("T")
_failed = False


class PeerFailed(RuntimeError):
    """Another rank failed (and reported it); this rank stops with the same exit ``code``."""

    def __init__(self, code: int) -> None:
        super().__init__(f"another rank failed (exit code {code}); its error is reported by that rank")
        self.code = code


def _dist():  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    return dist


def is_distributed() -> bool:
    """Whether this process is one rank of an initialised group of more than one process."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def rank_from_env() -> int:
    """This process's rank as torchrun describes it (``RANK`` when ``WORLD_SIZE`` > 1), before any group exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def _device() -> torch.device:
    """Where the group's collectives take their tensors (nccl: this rank's CUDA device)."""
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env() -> bool:
    """Create the default group from torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``...)
    unless one exists: nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``), gloo otherwise.
    Returns whether this call created it (the caller then destroys it)."""
    dist = _dist()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return True


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 outside a distributed run)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def rank_device(device: torch.device) -> torch.device:
    """The compute device of this rank: in a distributed run a CUDA device is this rank's own GPU,
    ``cuda:LOCAL_RANK``, so ``cuda`` (or ``auto``) becomes that; an explicit ``cuda:N`` that is not it is a
    ``ValueError`` (every rank would share GPU N). Unchanged in one process and for the CPU."""
    if device.type != "cuda" or not is_distributed():
        return device
    own = local_rank()
    if device.index is not None and device.index != own:
        raise ValueError(f"device {str(device)!r} in a distributed run: each rank computes on its own GPU, "
                         f"cuda:LOCAL_RANK (cuda:{own} on this rank); use device 'cuda' or 'auto'")
    return torch.device("cuda", own)


def agree(code: int = 0) -> None:
    """The status exchange every rank makes before each collective of the run (see the module docstring):
    raises :class:`PeerFailed` if another rank reported a failure."""
    if not is_distributed():
        return
    status = torch.tensor([code], dtype=torch.int64, device=_device())
    _dist().all_reduce(status, op=_dist().ReduceOp.MAX)
    if status.item() and not code:
        raise PeerFailed(int(status.item()))


def fail(code: int = 1) -> None:
    """This rank failed: tell the others at their next status exchange (once per process; never raises)."""
    global _failed
    if _failed or not is_distributed():
        return
    _failed = True
    try:
        agree(code)
    except Exception as exc:  # noqa: BLE001 - the rank's own error is what gets reported
        logger.debug("rank %d: could not tell the other ranks about its failure: %s", rank(), exc)


def exit_code(exc: BaseException) -> int | None:
    """The code a rank failing with ``exc`` reports to the others (``None``: every rank stops with it, no
    report: a stop agreed at a layer boundary, or another rank's failure)."""
    if isinstance(exc, (RunInterrupted, PeerFailed)):
        return None
    return 130 if isinstance(exc, KeyboardInterrupt) else 1


F = TypeVar("F", bound=Callable[..., Any])


def reports_failure(func: F) -> F:
    """Any exception out of ``func`` on one rank is reported to the others (:func:`fail`) before it propagates."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except BaseException as exc:
            code = exit_code(exc)
            if code is not None:
                fail(code)
            raise

    return wrapper  # type: ignore[return-value]


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank (e.g. a stop requested by a signal on one of them)."""
    if not is_distributed():
        return flag
    agree()
    t = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous share of ``items`` (the first ranks take one more when they do not divide)."""
    n, world = len(items), world_size()
    if n < world:
        raise ValueError(f"{n} calibration batches cannot be shared by {world} processes: use at least {world} "
                         "batches (more calibration samples or a smaller batch_size) or fewer processes")
    start = shard_start(n)
    return list(items[start:start + n // world + (rank() < n % world)])


def shard_start(n: int) -> int:
    """The global index of this rank's first item of :func:`shard` over ``n`` items."""
    return _share(n, rank())[0]


def _share(n: int, r: int) -> tuple[int, int]:
    world = world_size()
    start = r * (n // world) + min(r, n % world)
    return start, start + n // world + (r < n % world)


def row_values(values: torch.Tensor, rows: int) -> torch.Tensor:
    """A per-row value of this rank's share of a weight of ``rows`` rows (:func:`row_share`), gathered from
    every rank: ``[rows]``, in row order, the same on every rank (a solve's
    :func:`~bpdq.solvers.base.given_row_gather`). A status exchange first: a rank whose solve failed ends
    the others' solves here."""
    if not is_distributed():
        return values
    agree()
    dev, world = _device(), world_size()
    widest = max(_share(rows, r)[1] - _share(rows, r)[0] for r in range(world))
    wire = torch.zeros(widest, dtype=values.dtype, device=dev)
    wire[:values.shape[0]] = values.to(dev)
    parts = [torch.empty_like(wire) for _ in range(world)]
    _dist().all_gather(parts, wire)
    return torch.cat([p[:_share(rows, r)[1] - _share(rows, r)[0]] for r, p in enumerate(parts)]).to(values.device)


def splits_rows(rows: int, rows_independent: bool) -> bool:
    """Whether a linear of ``rows`` output rows is solved by every rank, each its share of the rows: in a
    distributed run, for a solver whose rows are independent, when each share has at least 2 rows (one row
    alone would run through matrix-vector paths that may round differently)."""
    return rows_independent and is_distributed() and rows >= 2 * world_size()


def row_share(rows: int) -> tuple[int, int]:
    """This rank's contiguous share ``[r0, r1)`` of ``rows`` rows (the first ranks take one more)."""
    return _share(rows, rank())


def gather_rows(part: QuantizedWeight, rows: int) -> QuantizedWeight:
    """Every rank's row share of one weight (:func:`row_share`), solved on its rank, into the whole
    QuantizedWeight on every rank: packed planes and coefficients travel from each rank in turn, with its
    statistics (the losses are summed, the reference of the relative loss too; the time is the slowest
    share's). A no-op in one process."""
    if not is_distributed():
        return part
    agree()
    dev, home = _device(), part.planes.device
    k, _, cols = part.planes.shape
    n_groups = part.coeffs.shape[0]
    planes, coeffs, stats = [], [], []
    for src in range(world_size()):
        r0, r1 = _share(rows, src)
        mine = src == rank()
        p = part.planes.contiguous().to(dev) if mine else torch.empty(k, r1 - r0, cols, dtype=torch.uint8, device=dev)
        c = part.coeffs.contiguous().to(dev) if mine else torch.empty(n_groups, k + 1, r1 - r0, dtype=part.coeffs.dtype, device=dev)
        _dist().broadcast(p, src)
        _dist().broadcast(c, src)
        planes.append(p.to(home))
        coeffs.append(c.to(home))
        stats.append(json.loads(_broadcast_bytes(json.dumps(part.stats.to_dict()).encode() if mine else None, src)))
    return QuantizedWeight(torch.cat(planes, 1), torch.cat(coeffs, 2), part.group_size, (rows, part.shape[1]),
                           part.dtype, part.grid, part.solver, _merged_stats(stats))


def spread(jobs: Sequence[Callable[[], torch.Tensor | SweepFactor]]) -> list[torch.Tensor | SweepFactor]:
    """Each job run by one rank (job ``i`` by rank ``i`` mod the world size) and its result, a tensor or a
    :class:`~bpdq.solvers.sweep.SweepFactor`, sent to every rank: each rank's results, in the jobs' order, on
    its compute device. Factorisations that several ranks need are made once this way, side by side. A
    transposed tensor arrives transposed (a factor is the transposed view of its storage; products with it
    round as they do with the original's layout). Every job runs in one process."""
    if not is_distributed():
        return [job() for job in jobs]
    world, me = world_size(), rank()
    mine = {i: job() for i, job in enumerate(jobs) if i % world == me}
    out: list[torch.Tensor | SweepFactor] = []
    for i in range(len(jobs)):
        agree()
        src, value = i % world, mine.get(i)
        meta = wire = None
        if value is not None:
            U = value.U if isinstance(value, SweepFactor) else value
            flipped = not U.is_contiguous() and U.mT.is_contiguous()
            wire = (U.mT if flipped else U).contiguous().to(_device())
            extra = ({"damp": value.damp, "retries": value.retries, "mean_diag": value.mean_diag}
                     if isinstance(value, SweepFactor) else None)
            meta = json.dumps({"shape": list(wire.shape), "dtype": str(wire.dtype).removeprefix("torch."),
                               "flipped": flipped, "extra": extra}).encode()
        info = json.loads(_broadcast_bytes(meta, src))
        if wire is None:
            wire = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]), device=_device())
        _dist().broadcast(wire, src)
        if value is not None:
            out.append(value)
            continue
        U = wire.mT if info["flipped"] else wire
        out.append(U if info["extra"] is None else SweepFactor(U=U, **info["extra"]))
    return out


def _merged_stats(parts: list[dict[str, Any]]) -> SolveStats:
    """One weight's statistics from its row shares' (see :func:`gather_rows`)."""
    extra = dict(parts[0].get("extra", {}))
    if "refit" in extra:
        extra["refit"] = {key: sum(p["extra"]["refit"][key] for p in parts) for key in extra["refit"]}
    merged = SolveStats(time_s=max(p["time_s"] for p in parts), extra=extra)
    if all(p["proxy_loss"] is not None for p in parts):
        loss = sum(p["proxy_loss"] for p in parts)
        reference = sum(p["proxy_loss"] / p["relative_loss"] for p in parts if p["relative_loss"])
        merged.proxy_loss, merged.relative_loss = loss, relative_loss(loss, reference)
    return merged


def reduce_hessians(accs: Sequence[HessianAccumulator | AsymmetricAccumulator], dests: Sequence[Collection[int]]) -> None:
    """Sum each accumulator (a Hessian's, or asymmetric calibration's with its cross moment) over the ranks,
    in place, onto the ranks in its ``dests`` (the owners of the linears it serves): one status exchange for all of them, then every float64 block is reduced
    asynchronously (``dist.reduce`` to a single owner; an all-reduce where several ranks own linears that
    share the accumulator) and the sample counts go to every rank in one all-reduce. Afterwards only the
    ranks in ``dests`` hold the sum; on the others the accumulator's blocks are undefined (drop it). A no-op
    in one process."""
    if not is_distributed():
        return
    agree()
    dist, dev = _dist(), _device()
    counts = torch.tensor([acc.n for acc in accs], dtype=torch.int64, device=dev)
    works = [dist.all_reduce(counts, async_op=True)]
    late: list[tuple[torch.Tensor, torch.Tensor]] = []  # blocks that live off the collectives' device
    for acc, dest in zip(accs, dests):
        owners = sorted(set(dest))
        if not owners:
            raise ValueError("a Hessian must have at least one owner rank")
        for block in acc.sums:
            wire = block if block.device == dev else block.to(dev)
            if wire is not block:
                late.append((block, wire))
            if len(owners) == 1:
                works.append(dist.reduce(wire, owners[0], async_op=True))
            else:
                works.append(dist.all_reduce(wire, async_op=True))
    for work in works:
        work.wait()
    for block, wire in late:
        block.copy_(wire)
    for acc, n in zip(accs, counts.tolist()):
        acc.n = int(n)


def all_reduce_counts(counts: torch.Tensor) -> torch.Tensor:
    """An int64 tensor summed over the ranks (a copy on every rank; ``counts`` itself in one process)."""
    if not is_distributed():
        return counts
    agree()
    wire = counts.to(device=_device(), dtype=torch.int64)
    _dist().all_reduce(wire)
    return wire.to(counts.device)


def share_weight(qw: QuantizedWeight | None, owner: int) -> QuantizedWeight:
    """The QuantizedWeight solved on ``owner`` (which passes it; the others pass ``None``) on every rank: its
    metadata and statistics as JSON, then its packed planes and coefficients. A no-op in one process."""
    if not is_distributed():
        assert qw is not None
        return qw
    agree()
    mine = rank() == owner
    meta = None
    if mine:
        assert qw is not None
        meta = json.dumps({"shape": list(qw.shape), "k": qw.k, "group_size": qw.group_size,
                           "dtype": str(qw.dtype).removeprefix("torch."), "grid": qw.grid, "solver": qw.solver,
                           "stats": qw.stats.to_dict()}).encode()
    info = json.loads(_broadcast_bytes(meta, owner))
    out, inp = info["shape"]
    k, g = info["k"], info["group_size"]
    dev = _device()
    planes = qw.planes.contiguous().to(dev) if mine else torch.empty(k, out, inp // 8, dtype=torch.uint8, device=dev)
    coeffs = (qw.coeffs.contiguous().to(dev) if mine
              else torch.empty(inp // g, k + 1, out, dtype=torch.float16, device=dev))
    _dist().broadcast(planes, owner)
    _dist().broadcast(coeffs, owner)
    if mine:
        return qw
    stats = info["stats"]
    return QuantizedWeight(planes.cpu(), coeffs.cpu(), g, (out, inp), getattr(torch, info["dtype"]), info["grid"],
                           info["solver"], SolveStats(proxy_loss=stats["proxy_loss"], relative_loss=stats["relative_loss"],
                                                      time_s=stats["time_s"], best_iters=stats["best_iters"],
                                                      extra=stats.get("extra", {})))


def check_same(value: str, what: str) -> None:
    """Rank 0's ``value`` is the run's: every rank compares its own with it, and if any differs every rank
    raises ``ValueError`` naming ``what`` and both values. A no-op in one process."""
    if not is_distributed():
        return
    agree()
    ref = _broadcast_bytes(value.encode() if rank() == 0 else None, 0).decode()
    differs = torch.tensor([int(ref != value)], dtype=torch.int64, device=_device())
    _dist().all_reduce(differs, op=_dist().ReduceOp.MAX)
    if differs.item():
        mine = f"rank {rank()} has {value!r}" if ref != value else "another rank has something else"
        raise ValueError(f"the ranks disagree on {what}: rank 0 has {ref!r}, {mine}")


def destroy() -> None:
    """Leave the default group (what :func:`init_from_env` created)."""
    if _dist().is_initialized():
        _dist().destroy_process_group()


def owners(sizes: dict[str, int]) -> dict[str, int]:
    """The rank that solves each linear of a group (``sizes``: its weight's element count): largest first, each
    to the least-loaded rank (the lowest on ties); the same answer on every rank. All 0 in one process."""
    load = [0] * world_size()
    out: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: -sizes[n]):  # stable: equal sizes keep the group's order
        r = min(range(len(load)), key=lambda i: load[i])
        out[name] = r
        load[r] += sizes[name]
    return out


def _broadcast_bytes(data: bytes | None, src: int) -> bytes:
    dev = _device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=dev)
    _dist().broadcast(size, src)
    buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev) if data is not None
           else torch.empty(int(size.item()), dtype=torch.uint8, device=dev))
    _dist().broadcast(buf, src)
    return bytes(buf.cpu().numpy().tobytes())


def share_linear(root: nn.Module, name: str, record: ModuleRecord | None, owner: int) -> ModuleRecord:
    """After the ranks solved their own linears of a group: the QuantLinear ``name`` of ``root`` goes from
    its ``owner`` (who passes its ``record``) to every other rank, which swaps its ``nn.Linear`` for it;
    returns the module's record. A no-op in one process."""
    if not is_distributed():
        assert record is not None
        return record
    agree()
    mine = rank() == owner
    module = root.get_submodule(name)
    meta = None
    if mine:
        assert record is not None and isinstance(module, QuantLinear)
        meta = json.dumps({"record": asdict(record), "planes": module.k, "group_size": module.group_size,
                           "kernel": module.kernel, "grid": module.grid, "solver": module.solver}).encode()
    info = json.loads(_broadcast_bytes(meta, owner))
    if not mine:
        linear = module
        module = QuantLinear(linear.in_features, linear.out_features, planes=info["planes"],
                             group_size=info["group_size"], bias=linear.bias is not None,
                             dtype=linear.bias.dtype if linear.bias is not None else linear.weight.dtype,
                             kernel=info["kernel"], device=linear.weight.device, grid=info["grid"], solver=info["solver"])
        module.weight_dtype = linear.weight.dtype
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        root.set_submodule(name, module)
    for buf in (module.planes, module.coeffs):
        wire = buf.to(_device())
        _dist().broadcast(wire, owner)
        if not mine:
            buf.copy_(wire)
    return ModuleRecord(**info["record"])


def barrier() -> None:
    """Every rank reaches this point (after a status exchange)."""
    if is_distributed():
        agree()
        _dist().barrier()
