"""sparkvision: image classifiers trained and served on Spark."""
