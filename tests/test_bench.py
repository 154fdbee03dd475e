"""`spikevaediff bench`: every stage runs for real and reports its same-run ratios."""
import json

import pytest

from spikevaediff.services.bench import collect_ratios
from spikevaediff.services.cli import main


def test_collect_ratios_flattens_only_ratio_keys():
    tree = {"a": {"x_ratio": 0.5, "iterations": 3, "payloads": {"p_ratio": 1.0}}, "b_ratio": 2}
    assert collect_ratios(tree) == {"a.x_ratio": 0.5, "b_ratio": 2.0}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_runs_every_stage_and_writes_ratios(small_session, trained_bundle, tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--session", str(small_session), "--bundle", str(trained_bundle), "--out", str(out),
                 "--quick", "--duration", "3"]) == 0
    result = json.loads((out / "bench.json").read_text())
    ratios = result["ratios"]
    for key in ("transport.worst_p50_ratio", "projection.bundle.projection_ratio",
                "projection.bundle.per_bin_work_ratio", "refiner.onnx_over_torch_ratio",
                "refiner.reduced_over_paper_time_ratio", "refiner.reduced_over_paper_unet_evaluations_ratio"):
        assert ratios[key] > 0, key
    # 5 reduced DPM-Solver++ steps vs 37 DDIM steps, both with guidance
    assert ratios["refiner.reduced_over_paper_unet_evaluations_ratio"] == pytest.approx(10 / 74)
    live = result["live"]
    assert live["hops"]["decode"]["n"] > 30 and live["counts_gaps"]["gaps"] == 0
    assert 0 < live["normalized_latency"]["decoder"]
    assert result["machine"]["cpu_count"] >= 1
    assert "| transport.worst_p50_ratio |" in (out / "bench.md").read_text()
    assert (out / "latency.png").stat().st_size > 1000


def test_bench_missing_bundle_is_one_line(small_session, tmp_path, capsys):
    assert main(["bench", "--session", str(small_session), "--bundle", str(tmp_path / "none"),
                 "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bundle not found" in err[0]


def test_bench_bad_device_is_one_line(small_session, trained_bundle, tmp_path, capsys):
    import torch

    cases = [("gpu", "must be cpu, cuda or cuda:N")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device"))
    for device, expected in cases:
        assert main(["bench", "--session", str(small_session), "--bundle", str(trained_bundle),
                     "--out", str(tmp_path / "b"), "--device", device]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
