"""Metrics from a confusion matrix and the misclassified grid, on small hand-made inputs."""
import io

import numpy as np
import pytest
from PIL import Image

from pipelines.inference import metrics as M


def test_summary_and_per_class_from_a_confusion_matrix():
    cm = M.confusion_matrix([(0, 0, 8), (0, 1, 2), (1, 1, 10)], 2)
    assert cm.tolist() == [[8, 2], [0, 10]]
    assert M.summary(cm)["accuracy"] == pytest.approx(0.9)
    pc = M.per_class(cm)
    assert pc["precision"].tolist() == pytest.approx([1.0, 10 / 12]) and pc["recall"].tolist() == pytest.approx([0.8, 1.0])


@pytest.mark.parametrize("shape", [(28, 28, 1), (200, 160, 3)])
def test_the_misclassified_grid_is_a_png_with_a_tile_per_example_six_to_a_row(shape):
    rng = np.random.default_rng(0)
    rows = [(rng.integers(0, 255, shape, np.uint8).tobytes(), "a very long class name indeed, longer than a tile",
             "Shirt") for _ in range(8)]
    grid = Image.open(io.BytesIO(M.misclassified_grid_png(rows, shape, tile=100)))
    assert grid.format == "PNG"
    cell_w, cell_h = grid.width // 6, grid.height // 2  # 8 examples: two lines of six
    assert grid.width == 6 * cell_w and cell_w >= 100 and cell_h >= 100
    tile = np.asarray(grid.convert("L"))[cell_h:, :cell_w]  # the seventh example's cell is drawn
    assert tile.std() > 10
    last = np.asarray(grid.convert("L"))[cell_h:, 2 * cell_w:]  # the second line's empty cells stay white
    assert (last == 255).all()


def test_a_label_wider_than_the_tile_is_cut_with_an_ellipsis():
    from PIL import ImageDraw, ImageFont

    draw = ImageDraw.Draw(Image.new("RGB", (10, 10)))
    font = ImageFont.load_default(size=11)
    cut = M.fitted(draw, "true: a very long class name indeed", font, 80)
    assert cut.endswith("…") and draw.textlength(cut, font=font) <= 80
    assert M.fitted(draw, "true: Bag", font, 80) == "true: Bag"
