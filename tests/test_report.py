"""RunReport totals and JSON round trip."""

from __future__ import annotations

import pytest

from bpdq.report import ModuleRecord, RunReport


def make_report():
    return RunReport(
        modules=[
            ModuleRecord("a", skipped=False, n_params=100, recipe={"group_size": 64}, bits_per_weight=2.75, proxy_loss=1.0, relative_loss=0.1, time_s=0.5),
            ModuleRecord("b", skipped=False, n_params=300, recipe={"group_size": 64}, bits_per_weight=3.5),
            ModuleRecord("c", skipped=True, n_params=100),
        ],
        model="LlamaForCausalLM",
        total_params=1000,
    )


def test_totals():
    r = make_report()
    assert (r.n_quantized, r.n_skipped) == (2, 1)
    assert r.avg_bpw_quantized == pytest.approx((100 * 2.75 + 300 * 3.5) / 400)
    assert r.avg_bpw_model == pytest.approx((100 * 2.75 + 300 * 3.5 + 600 * 16) / 1000)
    assert r.fp16_bytes == 2000
    assert RunReport().avg_bpw_quantized is None and RunReport().avg_bpw_model is None


def test_json_round_trip(tmp_path):
    r = make_report()
    r.checkpoint_bytes = 1234
    r.write(tmp_path / "r.json")
    back = RunReport.read(tmp_path / "r.json")
    assert back == r
    assert back.to_dict()["totals"]["checkpoint_bytes"] == 1234
    with pytest.raises(ValueError, match="modules"):
        RunReport.from_dict({"model": "x"})
