"""The child process of a trial (`python -m pipelines.tune.trial_process TRIAL_DIR`): the train worker's loop as a
one-worker Horovod world, then, when asked, the trained model's accuracy and recall per class on other splits."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pipelines  # noqa: F401  (the environment, before TensorFlow)
from pipelines.tune.trial import RESULT_FILE, SPEC_FILE, spec_from_dict


def split_scores(model_path: str, split_url: str, num_classes: int, encoded: bool = False) -> dict[str, object]:
    """The trained model on a split: accuracy and the recall of each class (correct / rows of that class)."""
    import numpy as np
    import tf_keras as keras

    from pipelines.train.data import open_batch_reader

    model = keras.models.load_model(model_path, compile=False)
    hits, totals = np.zeros(num_classes), np.zeros(num_classes)
    with open_batch_reader(split_url, columns=["image", "label"]) as reader:
        for batch in reader:
            shape = model.input_shape[1:]
            if encoded:
                import tensorflow as tf

                from pipelines.dataset.encoding import decode_batch

                x = decode_batch(tf.constant(list(batch.image)), shape).numpy()
            else:
                x = np.stack([np.frombuffer(b, np.uint8) for b in batch.image]).reshape((-1, *shape))
            pred = model.predict(x, batch_size=512, verbose=0).argmax(-1)
            y = np.asarray(batch.label)
            np.add.at(totals, y, 1)
            np.add.at(hits, y[pred == y], 1)
    return {"accuracy": float(hits.sum() / max(totals.sum(), 1)), "rows": int(totals.sum()),
            "recall": [float(h / t) if t else None for h, t in zip(hits, totals)]}


def main(trial_dir: str) -> int:
    from pipelines.train.worker import train_worker

    job = json.loads((Path(trial_dir) / SPEC_FILE).read_text())
    spec = spec_from_dict(job["spec"])
    result = train_worker(spec)
    result["scores"] = {name: split_scores(result["model_path"], url, spec.data.num_classes, spec.data.encoded)
                        for name, url in job["score_urls"].items()}
    (Path(trial_dir) / RESULT_FILE).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
