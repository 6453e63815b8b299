"""The record of a quantization run: one entry per candidate module plus model-level totals (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPORT_FILE = "bpdq_report.json"


@dataclass
class ModuleRecord:
    name: str
    skipped: bool
    n_params: int
    recipe: dict[str, Any] | None = None
    bits_per_weight: float | None = None
    proxy_loss: float | None = None
    relative_loss: float | None = None
    time_s: float = 0.0
    #: How an expert of a mixture of experts was calibrated: ``{"tokens": routed tokens, "hessian": "mixed" |
    #: "routed" | "pooled" | "all"}`` (``None`` for other modules).
    calibration: dict[str, Any] | None = None


@dataclass
class RunReport:
    modules: list[ModuleRecord] = field(default_factory=list)
    model: str = ""
    total_params: int = 0  # every parameter of the model, tied ones once
    total_time_s: float = 0.0
    calibration: dict[str, Any] = field(default_factory=dict)
    checkpoint_bytes: int | None = None  # size of model.safetensors, filled in by save()
    # the stages that ran (by name, in order); the built-in quality options' entries (None when off):
    # asymmetric calibration's settings, the coefficient tuning of each decoder layer (TuningResult.to_dict()
    # + "layer"), the bit allocation (Allocation.to_dict()); ``extra``: entries of user stages
    stages: list[str] = field(default_factory=list)
    asymmetric: dict[str, Any] | None = None
    tuning: list[dict[str, Any]] | None = None
    allocation: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> list[ModuleRecord]:
        return [m for m in self.modules if not m.skipped]

    @property
    def n_quantized(self) -> int:
        return len(self.quantized)

    @property
    def n_skipped(self) -> int:
        return len(self.modules) - self.n_quantized

    @property
    def avg_bpw_quantized(self) -> float | None:
        """Bits per weight averaged over the quantized weights."""
        q = self.quantized
        n = sum(m.n_params for m in q)
        return sum(m.n_params * (m.bits_per_weight or 0.0) for m in q) / n if n else None

    @property
    def avg_bpw_model(self) -> float | None:
        """Bits per parameter of the whole model, counting every unquantized parameter at 16 bits."""
        if not self.total_params:
            return None
        q = self.quantized
        quant_bits = sum(m.n_params * (m.bits_per_weight or 0.0) for m in q)
        rest = self.total_params - sum(m.n_params for m in q)
        return (quant_bits + 16 * rest) / self.total_params

    @property
    def fp16_bytes(self) -> int:
        return 2 * self.total_params

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "modules"}
        data["modules"] = [asdict(m) for m in self.modules]
        data["totals"] = {
            "modules_quantized": self.n_quantized,
            "modules_skipped": self.n_skipped,
            "avg_bpw_quantized": self.avg_bpw_quantized,
            "avg_bpw_model": self.avg_bpw_model,
            "fp16_bytes": self.fp16_bytes,
            "checkpoint_bytes": self.checkpoint_bytes,
        }
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunReport":
        if not isinstance(data, dict) or not isinstance(data.get("modules"), list):
            raise ValueError("a run report must be a JSON object with a 'modules' list")
        known = {f.name for f in fields(cls)} - {"modules"}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(modules=[ModuleRecord(**m) for m in data["modules"]], **kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunReport":
        return cls.from_dict(json.loads(text))

    def write(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: str | Path) -> "RunReport":
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
