"""The recovery table puts each report's bins in the right cells (rarest first), rows in architecture x
width order, and the optional columns only where some SAE has them; mismatched reports are refused."""

from __future__ import annotations

import json

import pytest

from saepipe.analyze.recovery_table import frontier_metrics, load_reports, recovery_table
from saepipe.errors import SaepipeError

# Three bins as recovery.py writes them: most frequent first, unequal feature counts.
FREQS = [(2, 0.1, 0.05), (3, 0.01, 0.002), (5, 1e-3, 1e-4)]  # (n_features, freq_max, freq_min)


def _report(recovered: list[float], cos: list[float], mmcs: float) -> dict:
    """A hand-built recovery report; `recovered`/`cos` per bin, most frequent bin first."""
    bins = [
        {"n_features": n, "freq_max": hi, "freq_min": lo, "fraction_recovered": r, "mean_best_cos": c,
         "mean_matched_cos": c / 2, "mean_best_f1": 0.5, "mean_spread": 1.0, "never_present": 0}
        for (n, hi, lo), r, c in zip(FREQS, recovered, cos)
    ]  # fmt: skip
    return {"mmcs": mmcs, "matched_score": mmcs / 2, "fraction_recovered": 0.0, "by_frequency": bins}


REPORTS = {
    "relu-w64": _report([1.0, 0.5, 0.2], [0.99, 0.9, 0.6], 0.8),
    "topk-w128-k4": _report([1.0, 1.0, 0.4], [0.99, 0.95, 0.7], 0.9),
    "topk-w64-k4": _report([1.0, 2 / 3, 0.0], [0.98, 0.9, 0.5], 0.7),
}


def test_cells_rows_and_optional_columns():
    table = recovery_table(REPORTS)
    rows = table.data["rows"]
    # topk before relu (ARCH_ORDER), then by width
    assert [r["name"] for r in rows] == ["topk-w64-k4", "topk-w128-k4", "relu-w64"]
    assert [(r["architecture"], r["width"], r["k"]) for r in rows] == [
        ("topk", 64, 4),
        ("topk", 128, 4),
        ("relu", 64, None),
    ]
    assert rows[0]["bins"] == [0.0, 2 / 3, 1.0]  # rarest first
    assert rows[0]["all"] == pytest.approx((5 * 0.0 + 3 * 2 / 3 + 2 * 1.0) / 10)
    assert table.data["bins"][0] == {"n_features": 5, "freq_min": 1e-4, "freq_max": 1e-3}
    assert rows[2]["l0"] is None and rows[2]["mmcs"] == 0.8

    lines = table.markdown.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert head == [
        "architecture",
        "width",
        "1: 1.0e-04–1.0e-03",
        "2: 2.0e-03–1.0e-02",
        "3: 5.0e-02–1.0e-01",
        "all",
        "MMCS",
        "matched",
    ]  # fmt: skip  (no L0/FVU: nobody measured them)
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells == ["topk (k=4)", "128", "0.40", "1.00", "1.00", "0.70", "0.900", "0.450"]
    json.loads(table.json())  # JSON-ready as promised


def test_metrics_add_columns_and_identity():
    metrics = {
        "relu-w64": {"l0": 3.25, "fvu": 0.125},
        "topk-w64-k4": {"architecture": "topk", "d_sae": 64, "k": 4, "fvu": 0.5},
    }
    table = recovery_table(REPORTS, metrics, value="mean_best_cos")
    head = [c.strip() for c in table.markdown.splitlines()[0].strip("|").split("|")]
    assert head[-4:] == ["MMCS", "matched", "L0", "FVU"]
    by = {r["name"]: r for r in table.data["rows"]}
    assert by["relu-w64"]["bins"] == [0.6, 0.9, 0.99] and by["relu-w64"]["l0"] == 3.25
    assert by["topk-w128-k4"]["fvu"] is None
    relu_line = next(line for line in table.markdown.splitlines() if line.startswith("| relu"))
    assert relu_line.rstrip(" |").endswith("3.25 | 0.125") and "| – |" not in relu_line
    topk128 = next(line for line in table.markdown.splitlines() if "| 128 |" in line)
    assert topk128.endswith("| – | – |")


def test_refusals(tmp_path):
    other = _report([1, 1, 1], [1, 1, 1], 1.0)
    other["by_frequency"][0]["freq_max"] = 0.2  # another synthetic set
    with pytest.raises(SaepipeError, match="different frequency bins"):
        recovery_table({**REPORTS, "x": other})
    with pytest.raises(SaepipeError, match="unknown table value"):
        recovery_table(REPORTS, value="f1")
    with pytest.raises(SaepipeError, match="without a recovery report"):
        recovery_table(REPORTS, {"nope": {"l0": 1}})
    with pytest.raises(SaepipeError, match="not a recovery report"):
        recovery_table({"a": {"mmcs": 1}})


def test_load_reports_and_frontier_metrics(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps(REPORTS["relu-w64"]))
    assert load_reports({"relu-w64": tmp_path / "r.json"}) == {"relu-w64": REPORTS["relu-w64"]}
    rows = [
        {
            "sae": "/runs/x/relu-w64",
            "architecture": "relu",
            "d_sae": 64,
            "l0": 2.0,
            "fvu": 0.1,
            "k": None,
            "n_tokens": 5,
        }
    ]
    assert frontier_metrics(rows) == {
        "relu-w64": {"architecture": "relu", "d_sae": 64, "l0": 2.0, "fvu": 0.1}
    }


def test_budget_and_synthsaebench_columns():
    """Budget-curve names (-t<tokens>) give a samples column in budget order; MCC, F1 and absorption show
    when the reports carry them."""
    reports = {
        f"topk-w64-k4-t{t}": {
            **_report([1.0, 0.5, 0.2], [0.99, 0.9, 0.6], 0.8),
            "mcc": m,
            "f1": 0.5,
            "absorption_rate": 0.1,
        }
        for t, m in ((8 * 2**20, 0.7), (2 * 2**20, 0.6))
    }
    table = recovery_table(reports)
    assert [r["tokens"] for r in table.data["rows"]] == [2 * 2**20, 8 * 2**20]
    head = [c.strip() for c in table.markdown.splitlines()[0].strip("|").split("|")]
    assert head[:3] == ["architecture", "width", "samples"] and {"MCC", "F1", "absorption"} <= set(head)
    first = [c.strip() for c in table.markdown.splitlines()[2].strip("|").split("|")]
    assert first[2] == "2Mi" and first[head.index("MCC")] == "0.600"
