"""Where the model looked, in the run's report: heatmap overlays of the test split's most confident
mistakes and of a seeded sample of its correct predictions (headstart.evaluation.attention)."""

from __future__ import annotations

import numpy as np

from headstart.backbone.handles import Backbone
from headstart.evaluation.attention import explain_images, feature_map_function, overlay_grid_png
from headstart.reporting.plots import confident_mistake_indices, sample_indices

# The figures, by file name (the report shows the run's plots by name: correct ones, then mistakes).
MISTAKES_PLOT = "where_the_model_looked_in_mistakes.png"
CORRECT_PLOT = "where_the_model_looked_in_correct_predictions.png"
ATTENTION_PLOTS = (CORRECT_PLOT, MISTAKES_PLOT)
# Images per figure: each costs one pass of the backbone.
SHOWN = 8


def plot_where_the_model_looked(
    backbone: Backbone,
    kernel: np.ndarray,
    bias: np.ndarray,
    labels: np.ndarray,
    paths: list[str],
    probabilities: np.ndarray,
    class_names: list[str],
    seed: int,
    shown: int = SHOWN,
) -> dict[str, bytes]:
    """The overlays of the `shown` most confident mistakes and of `shown` correct predictions
    drawn with `seed`, by file name (ATTENTION_PLOTS), for the Dense head (kernel, bias) on the
    backbone; a backbone without a feature map is a HeadstartError."""
    feature_map = feature_map_function(backbone)
    mistakes = confident_mistake_indices(labels, probabilities, shown)
    correct = np.flatnonzero(probabilities.argmax(axis=1) == labels)
    correct = correct[sample_indices(len(correct), shown, seed)]
    figures = {}
    for name, rows, title in (
        (CORRECT_PLOT, correct, "Where the model looked: sample of correct predictions"),
        (MISTAKES_PLOT, mistakes, "Where the model looked: most confident mistakes"),
    ):
        explanations = explain_images(feature_map, kernel, bias, [paths[row] for row in rows])
        figures[name] = overlay_grid_png(explanations, labels[rows], class_names, title)
    return figures
