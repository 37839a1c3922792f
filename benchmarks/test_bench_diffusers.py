"""Smoke test of benchmarks/bench_diffusers.py: it runs, and fastguide on the same evaluations computes what
diffusers' loop computes (the table's last column), for both models.

    .venv/bin/python -m pytest -q benchmarks/test_bench_diffusers.py"""
import pytest
import torch

pytest.importorskip("diffusers")

import bench_diffusers as bench  # noqa: E402


def test_quick_run_matches_diffusers():
    threads = torch.get_num_threads()
    try:
        outputs = bench.main_cli(["--quick"])  # sets 1 thread
    finally:
        torch.set_num_threads(threads)
    for output in outputs:
        rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in output.splitlines()[3:]}
        assert set(rows) == {"diffusers loop", "fastguide", "fastguide + interval", "fastguide dpm++(2M), 2 steps"}
        assert rows["fastguide"][3] == rows["diffusers loop"][3] == "8"  # the same evaluations
        assert float(rows["fastguide"][6].strip(" |")) < 1e-5           # the same result
        assert rows["fastguide + interval"][3] == "5" and rows["fastguide dpm++(2M), 2 steps"][3] == "4"
