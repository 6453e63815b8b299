"""The built-in stages a :class:`~bpdq.config.QuantizeConfig` turns on."""

from __future__ import annotations

from bpdq.config import QuantizeConfig
from bpdq.engine.allocate import BitAllocation
from bpdq.engine.quality import AsymmetricCalibration, CoefficientTuning, FullPrecisionStream
from bpdq.engine.stages import Stage


def builtin_stages(config: QuantizeConfig) -> list[Stage]:
    """The stages of ``config``'s quality options, in the order the loop calls them: the full-precision stream
    (for asymmetric calibration and tuning), asymmetric calibration, coefficient tuning, bit allocation."""
    stages: list[Stage] = []
    if config.calibration.asymmetric or config.tuning is not None:
        stages.append(FullPrecisionStream())
    if config.calibration.asymmetric:
        stages.append(AsymmetricCalibration())
    if config.tuning is not None:
        stages.append(CoefficientTuning(config.tuning))
    if config.target_bpw is not None:
        stages.append(BitAllocation(config.target_bpw))
    return stages
