"""dkuxnet.perf.traffic (``python tools/traffic.py``) counts bytes on the meta device: a hand-checkable op,
and a tiny training step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from dkuxnet.perf import traffic

ROOT = Path(__file__).resolve().parents[1]


def test_counter_hand_value():
    """a + b on two 1000-element fp32 tensors moves 3 × 4000 bytes; a view moves none."""
    a, b = torch.empty(1000, device="meta"), torch.empty(1000, device="meta")
    with traffic.TrafficCounter(large=1000) as counter:
        (a + b).view(10, 100)
    assert sum(counter.bytes.values()) == 12000 and sum(counter.large_bytes.values()) == 12000
    assert [k[1] for k in counter.bytes] == ["add"]


def test_tiny_step(tmp_path):
    out = tmp_path / "t.json"
    assert traffic.main(["--preset", "tiny", "--out", str(out)]) == 0
    assert traffic.main(["--preset", "tiny", "--set", "model.checkpoint_activations=true", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 and rows[0]["batch"] == 8 and rows[0]["patch"] == [32, 32, 32]
    assert rows[1]["total_gb"] > rows[0]["total_gb"] > rows[0]["full_resolution_gb"] > 0  # recompute moves more
    assert set(rows[0]["by_phase_gb"]) == {"forward", "loss", "backward"}


def test_perf_report_renders_traffic_rows(tmp_path):
    from dkuxnet.perf.report import perf_report

    row = {"commit": "abcdef1234567890", "preset": "paper", "batch": 8, "patch": [112, 112, 80], "total_gb": 1237.9,
           "full_resolution_gb": 1002.6, "by_phase_gb": {"forward": 302.4, "loss": 25.8, "backward": 909.7}}
    (tmp_path / "traffic_meta.json").write_text(json.dumps({"method": "m", "rows": [row]}))
    text = perf_report(tmp_path)
    assert "| `abcdef123456` | `paper`, 8 × 112×112×80 | 1238 | 1003 | 302 | 26 | 910 |" in text


def test_live_memory_hand_values():
    """Live bytes follow creation and release: 4 kB for a, +4 kB for b, back to 4 kB after del b; peak 8 kB."""
    with traffic.LiveMemory() as live:
        a = torch.empty(1000, device="meta")
        b = a * 2
        assert live.live == 8000
        del b
        assert live.live == 4000
        a.view(10, 100)  # a view allocates nothing
    assert live.peak == 8000 and live.live == 4000
    assert sorted(n for n in live.at_peak.values()) == [4000, 4000]


def test_peak_of_tiny_step(capsys):
    assert traffic.main(["--preset", "tiny", "--peak"]) == 0
    p = traffic.peak("tiny", {})
    assert p["peak_gib"] >= p["forward_peak_gib"] >= p["after_forward_gib"] > 0
    assert p["alive_at_peak"] and sum(r["gib"] for r in p["alive_at_peak"]) <= p["peak_gib"] + 1e-9
    assert "alive after forward + loss" in capsys.readouterr().out


def test_tools_shims_run_the_subpackage(tmp_path):
    """``python tools/traffic.py`` and ``python tools/memprobe.py`` still work: they run the subpackage's main."""
    for tool in ("traffic", "memprobe"):
        done = subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), "--help"], capture_output=True,
                              text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0 and "--preset" in done.stdout, done.stderr
