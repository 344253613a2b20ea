"""The decode-loop benchmark runs end to end on a short setting and refuses bad options."""

import json

import pytest

from chat import bench_loop


def test_a_short_run_reports_every_row_count_and_load(capsys):
    args = ["--gen", "8", "--rows", "2", "--repeats", "1", "--load", "0,0.2", "--json"]
    assert bench_loop.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert [entry["load"] for entry in result["results"]] == [0.0, 0.2]
    for entry in result["results"]:
        assert set(entry["engine_tok_per_s"]) == {"1", "2"}
        assert set(entry["loop"]) == {"1", "2"}
        for figures in entry["loop"].values():
            assert figures["tok_per_s"] > 0 and figures["decode"] > 0
            assert 0 < figures["ttft"] < 10


def test_the_report_names_the_columns(capsys):
    assert bench_loop.main(["--gen", "4", "--rows", "2", "--repeats", "1", "--load", "0"]) == 0
    report = capsys.readouterr().out
    assert "engine alone" in report and "decode loop" in report
    assert report.count("x ") >= 2  # one ratio per row count


@pytest.mark.parametrize("option", [["--load", "1.5"], ["--rows", "0"], ["--gen", "0"]])
def test_bad_options_are_refused(option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_loop.main(option)
    assert exit_info.value.code == 2
    assert "--" in capsys.readouterr().err
