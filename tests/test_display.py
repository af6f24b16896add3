import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from skpatchcore import PatchCoreDetector  # noqa: E402
from skpatchcore.display import AnomalyMapDisplay  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def maps():
    rng = np.random.RandomState(0)
    maps = rng.rand(5, 16, 16).astype(np.float32)
    maps[:, 4:8, 4:8] += 2.0  # a hot square, outlined at threshold 1.5
    return maps


def test_from_predictions_fills_a_grid_with_one_colour_scale(maps):
    images = np.zeros((5, 16, 16, 3), dtype=np.uint8)
    display = AnomalyMapDisplay.from_predictions(images, maps, threshold=1.5, n_cols=3)
    assert display.ax_.shape == (5,)
    assert len(display.figure_.axes) == 3 * 2 + 1  # grid cells and the colour bar
    assert sum(ax.get_visible() for ax in display.figure_.axes[:6]) == 5
    assert {o.get_clim() for o in display.overlays_} == {(float(maps.min()), float(maps.max()))}
    assert display.colorbar_.ax.get_ylabel() == "anomaly map"


def test_predicted_and_true_outlines_are_drawn(maps):
    images = np.zeros((5, 16, 16), dtype=np.float32)
    masks = np.zeros((5, 16, 16), dtype=bool)
    masks[0, 4:8, 4:8] = True
    display = AnomalyMapDisplay.from_predictions(images, maps, threshold=1.5, masks=masks)
    contour_colours = [
        [tuple(c) for c in child.get_edgecolor()]
        for child in display.ax_[0].get_children()
        if type(child).__name__ == "QuadContourSet"
    ]
    white, lime = (1.0, 1.0, 1.0, 1.0), matplotlib.colors.to_rgba("lime")
    assert contour_colours == [[white], [lime]]
    assert len(display.figure_.legends[0].get_texts()) == 2


def test_plot_draws_into_given_axes(maps):
    fig, axes = plt.subplots(1, 2)
    display = AnomalyMapDisplay(images=np.zeros((2, 16, 16)), anomaly_maps=maps[:2]).plot(
        ax=axes, colorbar=False
    )
    assert display.figure_ is fig and list(display.ax_) == list(axes)
    assert display.colorbar_ is None


def test_too_few_axes_are_refused(maps):
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="2 Axes for 5 images|1 Axes for 5 images"):
        AnomalyMapDisplay.from_predictions(np.zeros((5, 16, 16)), maps, ax=ax)


def test_maps_must_match_images(maps):
    with pytest.raises(ValueError, match="do not match"):
        AnomalyMapDisplay.from_predictions(np.zeros((5, 8, 8)), maps)


def test_from_estimator_uses_the_pixel_threshold_and_titles_scores(tiny_params, textures):
    normal, defective, masks = textures
    detector = PatchCoreDetector(**tiny_params).fit(normal)
    display = AnomalyMapDisplay.from_estimator(detector, defective[:2], masks=masks[:2])
    assert display.threshold == detector.pixel_threshold_
    scores = -detector.score_samples(defective[:2])
    assert [ax.get_title() for ax in display.ax_] == [f"anomaly score {s:.3g}" for s in scores]


def test_missing_matplotlib_raises_a_clear_import_error(monkeypatch, maps):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="matplotlib"):
        AnomalyMapDisplay.from_predictions(np.zeros((5, 16, 16)), maps)
