import pytest

from openk2.eval.report import Report, largest_rise, plot_training, smooth, table, training_summary


def test_largest_rise_is_the_worst_climb_over_the_running_minimum():
    assert largest_rise([5.0, 4.0, 3.0]) == 0.0
    assert largest_rise([5.0, 3.0, 3.5, 2.0, 2.8, 1.0]) == pytest.approx(0.8)
    assert smooth([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # bias-corrected from the start


def test_summary_plots_and_report(tmp_path):
    records = [{"step": i, "loss": 6.0 - 0.01 * i, "tokens": 100 * i, "max_logit": 10.0 + i / 10,
                "clipped_heads": int(i > 40), "time": i * 0.5} for i in range(1, 51)]
    records[19]["val_loss"], records[49]["val_loss"] = 5.9, 5.6
    summary = training_summary(records)
    assert summary["steps"] == 50 and summary["final_val_loss"] == 5.6
    assert summary["val_losses"] == [(20, 5.9), (50, 5.6)] and summary["largest_smoothed_rise"] == 0.0
    assert summary["max_logit"] == pytest.approx(15.0) and summary["clipped_steps"] == 10
    paths = plot_training(records, tmp_path, tau=12.0)
    assert set(paths) == {"loss", "max_logit"}
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths.values())
    report = Report(tmp_path, title="run")
    report.add("Pre-training",
               table([("final validation loss", 5.6)]) + "\n\n" + report.image(paths["loss"], "loss"))
    text = report.write().read_text()
    assert "| final validation loss | 5.6 |" in text and "![loss](pretrain_loss.png)" in text
