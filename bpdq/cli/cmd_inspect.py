"""``bpdq inspect DIR``: what a checkpoint holds (method, recipe per module, bpw, sizes, proxy losses).

Reads ``config.json``, ``bpdq_report.json`` and the safetensors headers, checked against the model the config
describes (tensor names, shapes, dtypes); the weights are not loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from bpdq.cli.console import emit_json, fmt_bytes, fmt_float, key_value_table, stdout_console
from bpdq.cli.errors import UsageError, usage_phase
from bpdq.cli.runtime import load_plugins


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "inspect",
        parents=[common],
        help="describe a bpdq checkpoint",
        description="Show a checkpoint's method, the recipe of every module, bits per weight, sizes and "
        "per-module proxy loss (from config.json and bpdq_report.json; weights are not loaded).",
    )
    p.add_argument("directory", metavar="DIR", help="a bpdq checkpoint directory")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(run=run)


def _recipe_text(recipe: dict[str, Any] | None) -> str:
    if not recipe:
        return "-"
    grid, solver = recipe.get("grid", {}), recipe.get("solver", {})

    def spec(d: dict[str, Any]) -> str:
        opts = ",".join(f"{k}={v}" for k, v in d.items() if k != "type")
        return f"{d.get('type', '?')}({opts})" if opts else str(d.get("type", "?"))

    return f"{spec(grid)} {spec(solver)} g={recipe.get('group_size', '?')}"


def describe(directory: Path) -> dict[str, Any]:
    """The JSON description of a checkpoint directory."""
    from bpdq.checkpoint import CONFIG_FILE, check_quantization_config, skeleton
    from bpdq.report import REPORT_FILE, RunReport

    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UsageError(f"{str(directory)!r} is not a bpdq checkpoint: {CONFIG_FILE} is missing")
    with usage_phase(str(config_path)):
        config = json.loads(config_path.read_text(encoding="utf-8"))
        qc = config.get("quantization_config")
        modules = check_quantization_config(qc)
    report = None
    if (directory / REPORT_FILE).is_file():
        with usage_phase(str(directory / REPORT_FILE)):
            report = RunReport.read(directory / REPORT_FILE)
    records = {m.name: m for m in report.modules} if report else {}
    with usage_phase(str(directory)):
        _, weights = skeleton(directory)  # the model on meta: every stored tensor's name, shape and dtype checked
    out_modules = []
    for experts, entry in [(n, e) for n, e in modules.items() if e.get("type") == "experts"]:
        del modules[experts]  # a fused experts module: a row per expert and projection (per projection without a report)
        for proj, settings in entry["projections"].items():
            names = [n for n in records if n.startswith(f"{experts}.") and n.endswith(f".{proj}")] or [f"{experts}.{proj}"]
            modules.update(dict.fromkeys(names, settings))
    for name in list(records) + [n for n in modules if n not in records]:  # the pipeline's order
        rec, meta = records.get(name), modules.get(name, {})
        recipe = rec.recipe if rec and rec.recipe else ({k: meta[k] for k in ("grid", "solver") if k in meta}
                                                        | ({"group_size": meta["group_size"]} if meta else {}))
        out_modules.append({
            "name": name,
            "skipped": rec.skipped if rec else name not in modules,
            "planes": meta.get("planes"),
            "recipe": recipe or None,
            "bits_per_weight": rec.bits_per_weight if rec else None,
            "n_params": rec.n_params if rec else None,
            "proxy_loss": rec.proxy_loss if rec else None,
            "relative_loss": rec.relative_loss if rec else None,
        })
    def types(key: str) -> list[str]:
        return sorted({m["recipe"][key]["type"] for m in out_modules if m["recipe"] and key in m["recipe"]})

    return {
        "directory": str(directory),
        "quant_method": qc["quant_method"],
        "format_version": qc.get("format_version"),
        "bpdq_version": qc.get("bpdq_version"),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "solvers": types("solver"),
        "grids": types("grid"),
        "modules_quantized": len(modules),
        "modules_skipped": sum(1 for m in out_modules if m["skipped"]),
        "avg_bpw_quantized": report.avg_bpw_quantized if report else None,
        "avg_bpw_model": report.avg_bpw_model if report else None,
        "checkpoint_bytes": sum(f.stat().st_size for f in weights.files),
        "fp16_bytes": report.fp16_bytes if report and report.total_params else None,
        "calibration": report.calibration if report else None,
        "modules": out_modules,
    }


def _tables(info: dict[str, Any]) -> list[Table]:
    ratio = (info["checkpoint_bytes"] / info["fp16_bytes"]) if info["checkpoint_bytes"] and info["fp16_bytes"] else None
    head = key_value_table(
        f"bpdq checkpoint {info['directory']}",
        [
            ("method", f"{info['quant_method']} (format {info['format_version']}, bpdq {info['bpdq_version']})"),
            ("architecture", info["architecture"]),
            ("solvers", ", ".join(info["solvers"]) or "n/a"),
            ("grids", ", ".join(info["grids"]) or "n/a"),
            ("modules quantized / skipped", f"{info['modules_quantized']} / {info['modules_skipped']}"),
            ("bits/weight (quantized weights)", fmt_float(info["avg_bpw_quantized"])),
            ("bits/weight (whole model)", fmt_float(info["avg_bpw_model"])),
            ("checkpoint size", fmt_bytes(info["checkpoint_bytes"])),
            ("fp16 size", fmt_bytes(info["fp16_bytes"])),
            ("size vs fp16", "n/a" if ratio is None else f"{ratio:.1%}"),
        ],
    )
    mods = Table(title="modules", title_justify="left")
    for col in ("module", "recipe", "bpw", "proxy loss", "relative loss"):
        mods.add_column(col, justify="left" if col in ("module", "recipe") else "right", no_wrap=True)
    for m in info["modules"]:
        recipe = "skipped (full precision)" if m["skipped"] else _recipe_text(m["recipe"])
        mods.add_row(m["name"], recipe, fmt_float(m["bits_per_weight"]), fmt_float(m["proxy_loss"]),
                     fmt_float(m["relative_loss"]))
    return [head, mods]


def run(args: argparse.Namespace) -> int:
    load_plugins(args.plugin)
    directory = Path(args.directory).expanduser()
    if not directory.is_dir():
        raise UsageError(f"{args.directory!r} is not a directory (give a bpdq checkpoint directory)")
    info = describe(directory)
    if args.json:
        emit_json(info)
    else:
        console = stdout_console()
        for table in _tables(info):
            console.print(table)
    return 0
