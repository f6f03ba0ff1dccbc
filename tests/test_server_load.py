"""The load generator against a live server: every level completes and reports throughput and latency."""

from __future__ import annotations

import json

from whiflash_sgl.server.load import main, percentile


def test_percentile_interpolates_between_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0.95) == 4.8
    assert percentile([7.0], 0.95) == 7.0


def test_load_levels_report_throughput_and_latency(server, tmp_path, capsys):
    out = tmp_path / "load.json"
    assert main(["--url", server.url, "--concurrency", "1,3", "--requests", "4", "--max-new-tokens", "6",
                 "--out", str(out)]) == 0
    assert "| concurrency |" in capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert [r["concurrency"] for r in rows] == [1, 3]
    for row in rows:
        assert row["requests"] == 4 and row["errors"] == 0 and 0 < row["output_tokens"] <= 24
        assert row["output_tokens_per_s"] > 0 and 0 < row["latency_p50_s"] <= row["latency_p95_s"]
        assert row["accept_length"] >= 1
