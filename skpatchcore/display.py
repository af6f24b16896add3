"""Anomaly maps drawn over their images, in the style of scikit-learn's ``*Display`` classes."""

from __future__ import annotations

import math

import numpy as np
from sklearn.utils._optional_dependencies import check_matplotlib_support

from .images import check_images
from .thresholds import transformed

__all__ = ["AnomalyMapDisplay"]

_PREDICTED_COLOUR = "white"
_TRUE_COLOUR = "lime"


class AnomalyMapDisplay:
    """Images with their anomaly maps, predicted-defect and true-defect outlines.

    Each image is drawn with its anomaly map overlaid in colour (one colour
    scale and one colour bar for all), the outline of the pixels above
    ``threshold`` (the predicted defect, white) and, when given, the outline
    of the ground-truth mask (green). Several images fill a grid.

    Build it with :meth:`from_estimator` or :meth:`from_predictions` rather
    than directly; call :meth:`plot` to draw an existing one again.
    matplotlib is needed to plot (``pip install matplotlib``).

    Parameters
    ----------
    images : array-like of shape (n, H, W, 3) or (n, H, W)
        uint8 in [0, 255] or float in [0, 1].
    anomaly_maps : array-like of shape (n, H, W)
        Higher is more anomalous, at the images' resolution.
    threshold : float or None, default=None
        Map value above which a pixel is predicted defective; None draws no
        predicted outline.
    masks : array-like of shape (n, H, W) or None, default=None
        Ground-truth defect masks.
    titles : sequence of str or None, default=None
        One title per image.

    Attributes
    ----------
    figure_ : matplotlib Figure
    ax_ : ndarray of matplotlib Axes
        One per image, in order (unused grid cells are hidden, not listed).
    overlays_ : list of matplotlib AxesImage
        The anomaly-map layers.
    colorbar_ : matplotlib Colorbar or None

    See Also
    --------
    sklearn.metrics.RocCurveDisplay : The pattern this class follows.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import numpy as np
    >>> from skpatchcore.display import AnomalyMapDisplay
    >>> images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    >>> maps = np.random.RandomState(0).rand(2, 16, 16)
    >>> display = AnomalyMapDisplay.from_predictions(images, maps, threshold=0.9)
    >>> display.ax_.shape
    (2,)
    """

    def __init__(self, *, images, anomaly_maps, threshold=None, masks=None, titles=None):
        self.images = images
        self.anomaly_maps = anomaly_maps
        self.threshold = threshold
        self.masks = masks
        self.titles = titles

    def plot(self, ax=None, *, n_cols=4, cmap="jet", alpha=0.5, vmin=None, vmax=None, colorbar=True):
        """Draw the images, maps and outlines.

        Parameters
        ----------
        ax : matplotlib Axes, array of Axes or None, default=None
            Where to draw: one Axes per image (a single Axes for a single
            image). None makes a new figure with a grid of ``n_cols`` columns.
        n_cols : int, default=4
            Grid columns of a new figure.
        cmap : str or Colormap, default="jet"
            Colour map of the anomaly maps.
        alpha : float, default=0.5
            Opacity of the anomaly maps over the images.
        vmin, vmax : float or None, default=None
            Colour scale of the maps; None uses the smallest and largest map
            value, so colours compare across the images.
        colorbar : bool, default=True
            Add one colour bar for all images.

        Returns
        -------
        display : AnomalyMapDisplay
            With ``figure_``, ``ax_``, ``overlays_`` and ``colorbar_`` set.
        """
        check_matplotlib_support(f"{type(self).__name__}.plot")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        images = check_images(self.images)
        maps = np.asarray(self.anomaly_maps, dtype=np.float32)
        if maps.shape != images.shape[:3]:
            raise ValueError(
                f"anomaly_maps of shape {maps.shape} do not match images of shape "
                f"{images.shape}: one (H, W) map per image, at its resolution."
            )
        masks = None if self.masks is None else np.asarray(self.masks).astype(bool)
        if masks is not None and masks.shape != maps.shape:
            raise ValueError(f"masks of shape {masks.shape} do not match the maps' {maps.shape}.")
        n = len(maps)
        if ax is None:
            n_cols = min(n_cols, n)
            n_rows = math.ceil(n / n_cols)
            fig, grid = plt.subplots(
                n_rows, n_cols, figsize=(3 * n_cols + 1, 3 * n_rows), squeeze=False,
                layout="constrained",
            )
            grid = grid.ravel()
        else:
            grid = np.asarray(ax, dtype=object).ravel()
            if len(grid) < n:
                raise ValueError(f"Got {len(grid)} Axes for {n} images; pass one per image.")
            fig = grid[0].figure
        vmin = float(maps.min()) if vmin is None else vmin
        vmax = float(maps.max()) if vmax is None else vmax

        overlays = []
        for i, axis in enumerate(grid[:n]):
            image = images[i, ..., 0] if images.shape[-1] == 1 else images[i]
            axis.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0,
                        vmax=255 if image.dtype == np.uint8 else 1)
            overlays.append(axis.imshow(maps[i], cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax))
            # contour() warns when no level is crossed: draw only outlines that exist.
            if self.threshold is not None and maps[i].min() <= self.threshold < maps[i].max():
                axis.contour(maps[i], levels=[self.threshold], colors=_PREDICTED_COLOUR, linewidths=1)
            if masks is not None and masks[i].any() and not masks[i].all():
                axis.contour(masks[i].astype(np.float32), levels=[0.5], colors=_TRUE_COLOUR, linewidths=1)
            if self.titles is not None:
                axis.set_title(self.titles[i], fontsize="small")
            axis.set_axis_off()
        for axis in grid[n:]:
            axis.set_visible(False)

        handles = []
        if self.threshold is not None:
            handles.append(Line2D([], [], color=_PREDICTED_COLOUR, label="predicted defect"))
        if masks is not None:
            handles.append(Line2D([], [], color=_TRUE_COLOUR, label="true defect"))
        if handles:
            fig.legend(handles=handles, loc="lower left", fontsize="small", facecolor="0.3",
                       labelcolor="white")
        self.colorbar_ = (
            fig.colorbar(overlays[0], ax=list(grid[:n]), label="anomaly map") if colorbar else None
        )
        self.figure_, self.ax_, self.overlays_ = fig, grid[:n], overlays
        return self

    @classmethod
    def from_predictions(
        cls, images, anomaly_maps, *, threshold=None, masks=None, titles=None, ax=None, **kwargs
    ):
        """Plot anomaly maps already computed.

        Parameters
        ----------
        images : array-like of shape (n, H, W, 3) or (n, H, W)
        anomaly_maps : array-like of shape (n, H, W)
        threshold : float or None, default=None
            Outline of the pixels above it; e.g. ``detector.pixel_threshold_``.
        masks : array-like of shape (n, H, W) or None, default=None
        titles : sequence of str or None, default=None
        ax : matplotlib Axes, array of Axes or None, default=None
        **kwargs
            Passed to :meth:`plot` (``n_cols``, ``cmap``, ``alpha``, ``vmin``,
            ``vmax``, ``colorbar``).

        Returns
        -------
        display : AnomalyMapDisplay
        """
        display = cls(
            images=images, anomaly_maps=anomaly_maps, threshold=threshold, masks=masks, titles=titles
        )
        return display.plot(ax=ax, **kwargs)

    @classmethod
    def from_estimator(cls, estimator, X, *, masks=None, threshold=None, ax=None, **kwargs):
        """Compute and plot the anomaly maps of a fitted detector.

        Parameters
        ----------
        estimator : fitted PatchCoreDetector, TunedThresholdDetectorCV or Pipeline ending in one
            Pipelines (e.g. with an :class:`~skpatchcore.ImageReader`) show
            the images their earlier steps produce.
        X : array-like of images or sequence of paths
            What the estimator takes.
        masks : array-like of shape (n, H, W) or None, default=None
            Ground-truth defect masks.
        threshold : float or None, default=None
            None uses the estimator's ``pixel_threshold_``.
        ax : matplotlib Axes, array of Axes or None, default=None
        **kwargs
            Passed to :meth:`plot`.

        Returns
        -------
        display : AnomalyMapDisplay
            Titles give each image's anomaly score (``-score_samples``).
        """
        images, detector = transformed(estimator, X)
        maps, scores = detector.anomaly_maps(images, return_score_samples=True)
        threshold = detector.pixel_threshold_ if threshold is None else threshold
        titles = [f"anomaly score {-s:.3g}" for s in scores]
        return cls.from_predictions(
            images, maps, threshold=threshold, masks=masks, titles=titles, ax=ax, **kwargs
        )
