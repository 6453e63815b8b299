"""The summary of a quantization run (a JSON-able dict) and its tables."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from bpdq.cli.console import fmt_bytes, fmt_float, key_value_table
from bpdq.report import RunReport

SUMMARY_FILE = "bpdq_summary.json"
STRATEGY_FILE = "strategy.yaml"
WORST = 5
QUALITY_OPTIONS = ("asymmetric", "tuning", "allocation")  # report entries copied into the summary when the option ran


def worst_modules(report: RunReport, n: int = WORST) -> list[dict[str, Any]]:
    """The ``n`` quantized modules with the largest relative proxy loss (those with a known loss)."""
    scored = [m for m in report.quantized if m.relative_loss is not None]
    scored.sort(key=lambda m: m.relative_loss, reverse=True)  # type: ignore[arg-type, return-value]
    return [
        {"name": m.name, "relative_loss": m.relative_loss, "proxy_loss": m.proxy_loss, "bits_per_weight": m.bits_per_weight}
        for m in scored[:n]
    ]


def run_summary(report: RunReport, model: str, output: str) -> dict[str, Any]:
    ratio = report.checkpoint_bytes / report.fp16_bytes if report.checkpoint_bytes and report.fp16_bytes else None
    return {
        "model": model,
        "output": output,
        "architecture": report.model,
        "modules_quantized": report.n_quantized,
        "modules_skipped": report.n_skipped,
        "avg_bpw_quantized": report.avg_bpw_quantized,
        "avg_bpw_model": report.avg_bpw_model,
        "checkpoint_bytes": report.checkpoint_bytes,
        "fp16_bytes": report.fp16_bytes,
        "size_ratio_vs_fp16": ratio,
        "time_s": report.total_time_s,
        "worst_modules": worst_modules(report),
    } | {key: value for key in QUALITY_OPTIONS if (value := getattr(report, key)) is not None}


def _quality_rows(summary: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if "asymmetric" in summary:
        rows.append(("asymmetric calibration", f"on (damp {summary['asymmetric']['damp']:g})"))
    if "tuning" in summary:
        tuned = summary["tuning"]
        before, after = sum(t["loss_before"] for t in tuned), sum(t["loss_after"] for t in tuned)
        rows.append(("coefficient tuning", f"{len(tuned)} layers, output MSE {fmt_float(before)} -> {fmt_float(after)}"))
    if "allocation" in summary:
        a = summary["allocation"]
        hist = ", ".join(f"{k}: {n}" for k, n in a["histogram"].items())
        rows.append(("bit allocation", f"{fmt_float(a['bpw'])} bpw (target {a['target_bpw']:g}); modules per planes {hist}"))
    return rows


def summary_tables(summary: dict[str, Any]) -> list[Table]:
    ratio = summary["size_ratio_vs_fp16"]
    totals = key_value_table(
        f"bpdq quantize: {summary['model']}",
        [
            ("modules quantized", summary["modules_quantized"]),
            ("modules skipped", summary["modules_skipped"]),
            ("bits/weight (quantized weights)", fmt_float(summary["avg_bpw_quantized"])),
            ("bits/weight (whole model)", fmt_float(summary["avg_bpw_model"])),
            ("checkpoint size", fmt_bytes(summary["checkpoint_bytes"])),
            ("fp16 size", fmt_bytes(summary["fp16_bytes"])),
            ("size vs fp16", "n/a" if ratio is None else f"{ratio:.1%}"),
            ("time", f"{summary['time_s']:.1f} s"),
            *_quality_rows(summary),
        ],
    )
    worst = Table(title=f"worst {WORST} modules by relative proxy loss", title_justify="left")
    for col in ("module", "relative loss", "proxy loss", "bpw"):
        worst.add_column(col, justify="left" if col == "module" else "right")
    for m in summary["worst_modules"]:
        worst.add_row(m["name"], fmt_float(m["relative_loss"]), fmt_float(m["proxy_loss"]), fmt_float(m["bits_per_weight"]))
    return [totals, worst]
