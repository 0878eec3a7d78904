"""Classification metrics from a confusion matrix (small: classes x classes), and their figures."""
from __future__ import annotations

import numpy as np


def confusion_matrix(pairs: list[tuple[int, int, int]], num_classes: int) -> np.ndarray:
    """(true, predicted, count) rows -> matrix[true, predicted]."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for true, pred, count in pairs:
        cm[true, pred] += count
    return cm


def per_class(cm: np.ndarray) -> dict[str, np.ndarray]:
    tp = np.diag(cm).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    actual = cm.sum(axis=1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def summary(cm: np.ndarray) -> dict[str, float]:
    pc = per_class(cm)
    support = pc["support"]
    return {"accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "macro_f1": float(pc["f1"].mean()),
            "weighted_f1": float((pc["f1"] * support).sum() / max(support.sum(), 1))}


def report(cm: np.ndarray, names: list[str]) -> str:
    """A scikit-learn style classification report."""
    pc = per_class(cm)
    width = max(len(n) for n in names + ["weighted avg"])
    lines = [f"{'':>{width}}  precision    recall  f1-score   support", ""]
    for i, n in enumerate(names):
        lines.append(f"{n:>{width}}  {pc['precision'][i]:9.4f} {pc['recall'][i]:9.4f} {pc['f1'][i]:9.4f} {int(pc['support'][i]):9d}")
    s = summary(cm)
    total = int(cm.sum())
    lines += ["", f"{'accuracy':>{width}}  {'':9} {'':9} {s['accuracy']:9.4f} {total:9d}",
              f"{'macro avg':>{width}}  {pc['precision'].mean():9.4f} {pc['recall'].mean():9.4f} {s['macro_f1']:9.4f} {total:9d}",
              f"{'weighted avg':>{width}}  {(pc['precision'] * pc['support']).sum() / max(total, 1):9.4f} "
              f"{(pc['recall'] * pc['support']).sum() / max(total, 1):9.4f} {s['weighted_f1']:9.4f} {total:9d}"]
    return "\n".join(lines) + "\n"


def confusion_figure(cm: np.ndarray, names: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(names), 1 + 0.6 * len(names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    top = cm.max() or 1
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > top / 2 else "black")
    return fig


def fitted(draw, text: str, font, width: int) -> str:
    """`text`, cut short with an ellipsis where it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def misclassified_grid_png(rows: list[tuple[bytes, str, str]], shape: tuple[int, int, int], tile: int = 144) -> bytes:
    """A PNG grid of (pixels, true name, predicted name), drawn with Pillow on an executor (importing matplotlib
    there cost the evaluation seconds); each image scaled to `tile` pixels under its two labels."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    n = max(1, len(rows))
    cols = min(6, n)
    head, pad = 30, 6
    cell_w, cell_h = tile + 2 * pad, tile + head + pad
    grid = Image.new("RGB", (cols * cell_w, ((n + cols - 1) // cols) * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (pixels, true, pred) in enumerate(rows):
        img = np.frombuffer(pixels, np.uint8).reshape(shape)
        picture = Image.fromarray(img.squeeze(-1) if shape[2] == 1 else img).convert("RGB")
        small = max(shape[:2]) < tile  # small images (28 px) as crisp blocks, photos smoothly
        picture.thumbnail((tile, tile), Image.Resampling.NEAREST if small else Image.Resampling.BILINEAR)
        if small:
            factor = tile // max(shape[:2])
            picture = picture.resize((shape[1] * factor, shape[0] * factor), Image.Resampling.NEAREST)
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        draw.text((x + pad, y + 2), fitted(draw, f"true: {true}", font, tile), fill="black", font=font)
        draw.text((x + pad, y + 15), fitted(draw, f"pred: {pred}", font, tile), fill="firebrick", font=font)
        grid.paste(picture, (x + pad + (tile - picture.width) // 2, y + head))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
