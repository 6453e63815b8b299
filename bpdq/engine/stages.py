"""The one way to extend the layer loop: a :class:`Stage`, with named lifecycle steps.

A run calls every stage at the same points, in the order the stages were given (the built-in ones first):

- ``setup(run)``: once, before the first decoder layer, when the plan and the calibration inputs exist:
  check the run, or make a pre-pass over the model (the bit allocation measures each linear here and puts
  its rules first with :meth:`RunContext.add_rules`).
- ``before_solve(step)``: a decoder layer is materialised on the compute device, nothing solved yet.
- ``hessians(step, names)``: the Hessian to solve each linear ``names`` of the current sequential group with.
  At most one stage of a run computes them (``provides_hessians = True``; asymmetric calibration does);
  otherwise the loop sums ``x x^T`` of the group's inputs. Such a stage may replace a linear's weight by
  the target to fit.
- ``observe(step)``: the layer is solved and on the device; the stage reads it and must not change it.
- ``after_solve(step)``: after every ``observe``; the stage may change the layer (keeping its QuantLinear
  modules), e.g. coefficient tuning. Sub-block outputs recorded for replay are dropped before it.
- ``after_write(step)``: the layer is written to the sink, not yet released.
- ``finish(report)``: after the last layer: the stage's entries of the :class:`~bpdq.report.RunReport`.

``state()`` / ``restore(state)``: what a resumed run needs of the stage (JSON), saved after each layer.
``fingerprint()``: the stage's settings; a run is resumed only from the state of a run with the same ones.
Stages that read the full-precision stream (``fp_stream = True``) make the loop carry the inputs each layer
receives in the full-precision model beside the quantized model's (``LayerStep.fp_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from bpdq.batch import Batch
from bpdq.config import Recipe, Rule
from bpdq.engine.replay import Replay
from bpdq.report import ModuleRecord, RunReport

if TYPE_CHECKING:
    from bpdq.engine.plan import RunPlan
    from bpdq.engine.source import ModelSource
    from bpdq.progress import RunProgress


@dataclass
class LayerStep:
    """One decoder layer's step: everything the stages read and fill in.

    ``plan`` maps each sequential group's linears (relative names) to their recipe (``None`` = skip).
    ``inputs`` are the layer's inputs in the quantized model (``None`` in a data-free run); ``fp_inputs``
    the full-precision stream (``None`` unless a stage reads it). ``outputs`` are filled in by the loop and
    become the next layer's ``inputs``; ``fp_outputs`` (filled in by a stage, from ``fp_layer``, a
    full-precision copy of the layer, dropped once they exist) the next ``fp_inputs``. ``replay`` records and replays the layer's
    finished sub-blocks (``blocks``: those it may replay, the adapter's ``replay``). A stage that computes
    Hessians and changes weights may skip the rows ``rows`` says another rank solves.
    """

    index: int
    prefix: str
    layer: nn.Module
    plan: list[dict[str, Recipe | None]]
    inputs: Sequence[Batch] | None
    device: torch.device
    fp_inputs: Sequence[Batch] | None = None
    outputs: Sequence[Batch] | None = None
    fp_outputs: Sequence[Batch] | None = None
    fp_layer: nn.Module | None = None
    records: list[ModuleRecord] = field(default_factory=list)
    replay: Replay | None = None
    fp_replay: Replay | None = None  # ``fp_layer``'s, when a stage replays its finished sub-blocks
    blocks: tuple[str, ...] = ()
    #: While a group's Hessians are computed: the rows ``(r0, r1)`` of each of its linears this rank solves
    #: (``None``: none, another rank solves it). Empty outside a distributed run: every row of every linear.
    rows: dict[str, tuple[int, int] | None] = field(default_factory=dict)
    #: Likewise: the ranks that solve each of the group's linears (rows of it or all of it), where its
    #: calibration sums must be reduced. Empty outside a distributed run.
    owners: dict[str, set[int]] = field(default_factory=dict)
    #: While a group's Hessians are computed, in a distributed run: the linears every rank solves rows of
    #: whose solver factorises ahead (:meth:`~bpdq.solvers.base.Solver.prefactor`), each with that
    #: function of its Hessian. A stage that factorises the Hessian too may make both factorisations on
    #: two ranks (:func:`~bpdq.engine.distributed.spread`) and leave the solver's in ``factors``.
    prefactors: dict[str, Callable[[torch.Tensor], Any]] = field(default_factory=dict)
    factors: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What :meth:`Stage.setup` sees of the run: the model's ``source``, the ``plan``, the compute
    ``device``, the calibration ``inputs`` of the first decoder layer (``None`` in a data-free run), the
    ``report`` being filled in and the ``progress`` display."""

    source: "ModelSource"
    plan: "RunPlan"
    device: torch.device
    inputs: Sequence[Batch] | None
    report: RunReport
    progress: "RunProgress"

    def add_rules(self, rules: Sequence[Rule]) -> None:
        """Put ``rules`` before the run's own (first match wins)."""
        self.plan.rules = (*rules, *self.plan.rules)


class Stage:
    """A step of the layer loop (see the module docstring); every method is optional."""

    #: The stage's name: its key in the resume state and in ``RunReport.stages`` (unique within a run).
    name: ClassVar[str] = "stage"
    #: Whether :meth:`hessians` computes the Hessians (at most one stage of a run does).
    provides_hessians: ClassVar[bool] = False
    #: Whether the stage reads the full-precision stream (``LayerStep.fp_inputs``).
    fp_stream: ClassVar[bool] = False
    #: Whether the stage needs calibration data (a run whose solvers all skip the Hessian is refused).
    needs_calibration: ClassVar[bool] = False
    #: Whether the stage runs in one process only (a distributed run is refused before any work).
    single_process: ClassVar[bool] = False

    def fingerprint(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any] | None:
        return None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a saved :meth:`state` (a resumed run)."""

    def check(self, plan: "RunPlan") -> None:
        """Raise ``ValueError`` before any work if the stage cannot serve ``plan``."""

    def setup(self, run: RunContext) -> None:
        pass

    def before_solve(self, step: LayerStep) -> None:
        pass

    def hessians(self, step: LayerStep, names: list[str]) -> dict[str, torch.Tensor] | None:
        return None

    def observe(self, step: LayerStep) -> None:
        pass

    def after_solve(self, step: LayerStep) -> None:
        pass

    def after_write(self, step: LayerStep) -> None:
        pass

    def finish(self, report: RunReport) -> None:
        pass


def check_stages(stages: Sequence[Any]) -> tuple[Stage, ...]:
    """``stages`` as a tuple, each a :class:`Stage` with a unique name and at most one computing Hessians."""
    out = tuple(stages)
    for s in out:
        if not isinstance(s, Stage):
            raise TypeError(f"stages must be bpdq.Stage instances, got {type(s).__name__}")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"two stages of the run are named {dup[0]!r}: give each Stage subclass its own name")
    providers = [s.name for s in out if s.provides_hessians]
    if len(providers) > 1:
        raise ValueError(f"stages {', '.join(map(repr, providers))} all compute the Hessians: a run takes one")
    return out
