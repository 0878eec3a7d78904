"""Experiment tables and time-to-reach, from made-up histories."""
from pipelines.tune.report import seconds_to_reach, table_text, variant_row


def history(accs, seconds=10.0):
    return [{"epoch": i, "val_accuracy": a, "epoch_seconds": seconds, "loss": 1.0, "val_loss": 1.0}
            for i, a in enumerate(accs)]


def run(accs, train_acc, test_acc):
    return {"history": history(accs), "scores": {"train": {"accuracy": train_acc},
                                                 "test": {"accuracy": test_acc, "recall": [0.5, 1.0]}}}


def test_seconds_to_reach_counts_training_time_until_the_first_epoch_at_the_target():
    assert seconds_to_reach(history([0.5, 0.8, 0.9]), 0.8) == 20.0
    assert seconds_to_reach(history([0.5, 0.6]), 0.8) is None


def test_a_variant_row_averages_its_seeds_and_says_how_many_reached():
    row = variant_row("adam", [run([0.7, 0.9], 0.95, 0.88), run([0.6, 0.7], 0.9, 0.7)], 0.8, ["a", "b"], True)
    assert abs(row["val_accuracy"][0] - 0.8) < 1e-9
    assert abs(row["train_minus_val"][0] - 0.125) < 1e-9  # (0.05 + 0.2) / 2
    assert row["best_epoch"] == 2.0
    assert row["seconds_to_0.8"] == (20.0, 1)
    assert row["recall a"] == (0.5, 0.0)
    md, csv_text = table_text([row])
    assert "20 (1/2 seeds)" in md and "0.8000 ± 0.1414" in md
    assert csv_text.splitlines()[0].startswith("variant,runs,val_accuracy_mean,val_accuracy_std")
