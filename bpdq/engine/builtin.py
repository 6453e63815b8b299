"""The stages a :class:`~bpdq.config.QuantizeConfig` turns on: the built-in ones of its quality options, then
the registered user stages its ``stages`` names."""

from __future__ import annotations

import logging
from typing import Sequence

from bpdq.config import QuantizeConfig
from bpdq.registry import STAGES
from bpdq.engine import moe
from bpdq.engine.allocate import BitAllocation
from bpdq.engine.plan import RunPlan
from bpdq.engine.quality import AsymmetricCalibration, CoefficientTuning, FullPrecisionStream
from bpdq.engine.stages import Stage

logger = logging.getLogger(__name__)


def config_stages(config: QuantizeConfig, given: Sequence[Stage] = ()) -> list[Stage]:
    """The stages of ``config``, in the order the loop calls them: the full-precision stream (for asymmetric
    calibration and tuning), asymmetric calibration, coefficient tuning, bit allocation, then each of
    ``config.stages`` (a registered name, or ``{type: NAME, **arguments}`` for its constructor). ``given``: the
    caller's own stages; ``calibration.asymmetric: auto`` leaves the Hessians to a stage that computes them."""
    named: list[Stage] = []
    for spec in config.stages:
        name, arguments = (spec["type"], {k: v for k, v in spec.items() if k != "type"}) if isinstance(spec, dict) else (spec, {})
        try:
            named.append(STAGES.get(name)(**arguments))
        except TypeError as exc:
            raise ValueError(f"stage {name!r} cannot be made with arguments {arguments}: {exc}") from None
    asymmetric = config.calibration.asymmetric
    if asymmetric == "auto" and any(getattr(s, "provides_hessians", False) for s in [*named, *given]):
        asymmetric = False
    stages: list[Stage] = []
    if asymmetric or config.tuning is not None or any(s.fp_stream for s in [*named, *given]):
        stages.append(FullPrecisionStream())
    if asymmetric:
        stages.append(AsymmetricCalibration(auto=asymmetric == "auto", damp=config.calibration.asymmetric_damp))
    if config.tuning is not None:
        stages.append(CoefficientTuning(config.tuning))
    if config.target_bpw is not None:
        stages.append(BitAllocation(config.target_bpw))
    return stages + named


def applicable(stages: Sequence[Stage], plan: RunPlan) -> list[Stage]:
    """``stages`` less asymmetric calibration turned on by ``auto`` where ``plan`` cannot use it (no solver
    uses a Hessian, or the model has expert layers), and less the full-precision stream nothing else needs."""
    skip = ("no solver uses a Hessian" if not plan.calibrated
            else "a mixture of experts" if moe.has_experts(plan) else None)
    out = list(stages)
    if skip is not None and any(isinstance(s, AsymmetricCalibration) and s.auto for s in out):
        logger.info("asymmetric calibration (auto): off, %s", skip)
        out = [s for s in out if not (isinstance(s, AsymmetricCalibration) and s.auto)]
        if not any(s.fp_stream for s in out if not isinstance(s, FullPrecisionStream)):
            out = [s for s in out if not isinstance(s, FullPrecisionStream)]
    return out
