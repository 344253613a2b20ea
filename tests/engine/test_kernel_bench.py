"""`python -m engine.kernel_bench` runs, caps what it must, and writes its table and charts."""

import pytest

from engine.kernel_bench import Scale, ladder, main, parse_scale

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--scales", "2", "--min-scale", "1x16x32", "--max-scale", "2x32x64", "--head-dim", "32",
        "--repeats", "2", "--device", "cpu"]  # fmt: skip
KERNELS = {
    "causal_conv1d": ("naive", "torch"),
    "delta_rule_chunked": ("naive", "chunked"),
    "delta_rule_recurrent": ("naive", "recurrent"),
}


def table_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]


def test_ladder_spans_the_spec_range_in_whole_heads():
    scales = ladder(Scale(2, 256, 128), Scale(64, 2048, 4096), 10, 128)
    assert len(scales) == 10
    assert scales[0] == Scale(2, 256, 128) and scales[-1] == Scale(64, 2048, 4096)
    assert all(s.hidden % 128 == 0 and s.seq % 16 == 0 for s in scales)
    sizes = [s.elements for s in scales]
    assert sizes == sorted(sizes) and len(set(sizes)) == 10
    assert parse_scale("3x5x7") == Scale(3, 5, 7)


def test_tiny_run_writes_table_and_both_charts(tmp_path, capsys):
    assert main([*TINY, "--visualize", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "agreement: every checked row" in out and "scales that ran" in out
    rows = table_rows((tmp_path / "kernel_bench.md").read_text())
    keys = {(r[0], r[1], r[2]) for r in rows}
    expected = {(k, impl, s) for k, impls in KERNELS.items() for impl in impls
                for s in ("1x16x32", "2x32x64")}  # fmt: skip
    assert keys == expected and len(rows) == len(expected)
    for r in rows:
        assert float(r[4]) > 0  # median ms
        if r[1] != "naive":
            assert r[8] == "ok" and float(r[7]) < 1e-5
    for name in ("kernel_times.png", "kernel_speedup.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_bf16_and_caps_are_reported(tmp_path, capsys):
    # A zero naive budget caps the reference after its first scale; a tiny memory budget skips
    # everything but must still leave one row per (kernel, impl, scale) saying why.
    argv = [*TINY, "--dtype", "bf16", "--naive-max-seconds", "1e-9", "--out-dir", str(tmp_path),
            "--kernels", "delta_rule_chunked"]  # fmt: skip
    assert main(argv) == 0
    rows = table_rows((tmp_path / "kernel_bench.md").read_text())
    by_key = {(r[1], r[2]): r for r in rows}
    assert by_key[("naive", "2x32x64")][10].startswith("skipped:")
    # Checked against the other, independent form (the recurrence in fp32) instead.
    assert by_key[("chunked", "2x32x64")][8] == "ok"
    assert by_key[("chunked", "2x32x64")][9] == "recurrent (fp32)"
    assert not (tmp_path / "kernel_times.png").exists()  # no --visualize

    assert main([*TINY, "--mem-budget-gb", "1e-9", "--out-dir", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "kernel_bench.md").read_text())
    assert len(rows) == 12 and all("budget" in r[10] for r in rows)
    assert "needs" in capsys.readouterr().out


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main(["--max-scale", "2x256"])
    assert main([*TINY, "--kernels", "nope"]) == 2
