"""benchmarks.sidecar_work: the sidecar's own work per request, in-process."""

from __future__ import annotations

from benchmarks import sidecar_work


def test_a_short_run_measures_the_released_request_and_its_access_log_entry() -> None:
    result = sidecar_work.run(sidecar_work.parse_args(["--requests", "30", "--runs", "2"]))
    assert result["runs"] == 2 and len(result["runs_us_per_request"]) == 2
    assert 0 < result["us_access_log_entry"] < result["us_per_request"]
    assert "profile" not in result


def test_the_profile_names_the_sidecars_functions() -> None:
    args = sidecar_work.parse_args(["--requests", "20", "--runs", "1", "--profile"])
    result = sidecar_work.run(args)
    assert "downstream.py" in result["profile"] and "access_log.py" in result["profile"]
