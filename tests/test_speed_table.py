"""``backend="auto"`` follows the measured speed table: nearest length in log scale, per regime."""

import torch

from poslsh.attention import speed


def test_measured_order(monkeypatch):
    table = {"GPU X": {"window": {"prefill": {"16384": {"flex": 2.0, "triton": 1.0},
                                              "262144": {"flex": 9.0, "triton": 12.0}},
                                  "decode": {"65536": {"triton": 0.02, "flex": 1.7}}}}}
    monkeypatch.setattr(speed, "_TABLE", table)
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU X")
    cuda = torch.device("cuda", 0)
    assert speed.measured_order(cuda, "window", 20000, 20000) == ["triton", "flex"]
    assert speed.measured_order(cuda, "window", 200000, 200000) == ["flex", "triton"]  # nearest: 256K
    assert speed.measured_order(cuda, "window", 1, 40000) == ["triton", "flex"]  # decode regime
    # below half the shortest measured length the table says nothing (failed before: 16K's order served 100 keys)
    assert speed.measured_order(cuda, "window", 100, 100) == [] and speed.measured_order(cuda, "window", 1, 4096) == []
    assert speed.measured_order(cuda, "window", 8192, 8192) == ["triton", "flex"]
    assert speed.measured_order(cuda, "exact", 100, 100) == []  # not measured: priorities decide
    assert speed.measured_order(torch.device("cpu"), "window", 100, 100) == []
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU Y")
    assert speed.measured_order(cuda, "window", 100, 100) == []


def test_load_table_replaces_the_table_and_forgets_public_plans(tmp_path, monkeypatch):
    """A benchmark that writes a table and asks auto again gets choices by the new table: load_table reads it
    and drops the public calls' remembered plans (which chose by the old one)."""
    import json

    import poslsh
    from poslsh.attention import public_plans

    monkeypatch.setattr(speed, "_TABLE", speed._TABLE)  # restored after the test
    monkeypatch.setattr(speed, "_device_name", lambda index: "GPU X")
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"devices": {"GPU X": {"exact": {"prefill": {"16384": {"flex": 2.0, "triton": 1.0}}}}}}))
    q = torch.randn(1, 2, 8, 16)
    poslsh.attention(q, q, q, is_causal=True)
    assert len(public_plans._PUBLIC) > 0
    speed.load_table(path)
    assert len(public_plans._PUBLIC) == 0
    assert speed.measured_order(torch.device("cuda", 0), "exact", 16384, 16384) == ["triton", "flex"]
    speed.load_table(tmp_path / "absent.json")  # an unreadable table: nothing measured, priorities decide
    assert speed.measured_order(torch.device("cuda", 0), "exact", 16384, 16384) == []
