"""The stages a :class:`~bpdq.config.QuantizeConfig` turns on: the built-in ones of its quality options, then
the registered user stages its ``stages`` names."""

from __future__ import annotations

from bpdq.config import QuantizeConfig
from bpdq.registry import STAGES
from bpdq.engine.allocate import BitAllocation
from bpdq.engine.quality import AsymmetricCalibration, CoefficientTuning, FullPrecisionStream
from bpdq.engine.stages import Stage


def config_stages(config: QuantizeConfig) -> list[Stage]:
    """The stages of ``config``, in the order the loop calls them: the full-precision stream (for asymmetric
    calibration and tuning), asymmetric calibration, coefficient tuning, bit allocation, then each of
    ``config.stages`` (a registered name, or ``{type: NAME, **arguments}`` for its constructor)."""
    stages: list[Stage] = []
    if config.calibration.asymmetric or config.tuning is not None:
        stages.append(FullPrecisionStream())
    if config.calibration.asymmetric:
        stages.append(AsymmetricCalibration())
    if config.tuning is not None:
        stages.append(CoefficientTuning(config.tuning))
    if config.target_bpw is not None:
        stages.append(BitAllocation(config.target_bpw))
    for spec in config.stages:
        name, arguments = (spec["type"], {k: v for k, v in spec.items() if k != "type"}) if isinstance(spec, dict) else (spec, {})
        try:
            stages.append(STAGES.get(name)(**arguments))
        except TypeError as exc:
            raise ValueError(f"stage {name!r} cannot be made with arguments {arguments}: {exc}") from None
    return stages
