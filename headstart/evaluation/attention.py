"""Where the model looked: class activation maps of the head over the backbone's last feature map.

headstart's head is one Dense layer on globally averaged features, so a class's logit is the
spatial mean of a map: logit_c = mean_ij (F(i,j) · W[:, c]) + b_c, F the backbone's last feature
map. That map, the class activation map (CAM), is then exact, not an approximation: its spatial
mean is the logit the model computed. It is what the report and `headstart explain` show, for
frozen and fine-tuned backbones alike (a fine-tuned backbone's last map feeds the same Dense head).

The score shown for class c is its logit less the mean of all logits: softmax ignores what adds
to every logit alike, so only what speaks for c more than for the other classes decides. Its map
is F · (W[:, c] − mean_k W[:, k]); the heatmap keeps its positive part, scaled to a peak of 1.

Grad-CAM (the gradient of a class score with respect to the feature map, averaged per channel,
weighting the channels) needs no linear head: `grad_cam` takes any head on pooled features. For
headstart's linear head it gives the same heatmap as the CAM (the tests check it), so the product
uses the exact map and Grad-CAM stays for heads that are not one Dense layer.

The backbone's map comes from the `feature_map` function that headstart's own TF Hub modules
export (headstart.backbone.hub_module); other modules have none. TensorFlow is imported only
where a module is loaded or a gradient taken.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from headstart.backbone.handles import Backbone
from headstart.data.images import load_image
from headstart.errors import HeadstartError

# Pixels of the longer side of an overlay: small images are enlarged to it, pixel by pixel.
OVERLAY_SIDE = 224
# How much of the heatmap's colour covers the image where the heatmap peaks.
HEAT_OPACITY = 0.5
COLORMAP = "jet"
RIGHT, WRONG = "#1a7f37", "#cf222e"


def feature_map_function(backbone: Backbone) -> Callable[[np.ndarray], np.ndarray]:
    """The backbone's images [batch, height, width, 3] in [0, 1] → its last feature map
    [batch, h, w, channels], as a function; a module without one is a one-line error."""
    from headstart.backbone.hub_module import FEATURE_MAP_SIGNATURE
    from headstart.infra.keras import tf

    module = tf.saved_model.load(str(backbone.module_path))
    if not hasattr(module, FEATURE_MAP_SIGNATURE):
        raise HeadstartError(
            f"backbone {backbone.handle} ({backbone.module_path}) has no feature map: only headstart's own "
            "backbones (the bundled one, or one fine-tuned by headstart, exported by this version) expose it; "
            "train a run on one of them to see where its model looked"
        )

    def feature_map(images: np.ndarray) -> np.ndarray:
        # Refers to the module, which owns the variables the function reads: they live as long as it.
        return getattr(module, FEATURE_MAP_SIGNATURE)(tf.constant(np.asarray(images, np.float32))).numpy()

    return feature_map


def class_activation_maps(feature_maps: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Each class's logit map [batch, h, w, classes] of a Dense head (kernel [channels, classes],
    bias [classes]) on the pooled maps [batch, h, w, channels]: its spatial mean is the logit."""
    return np.asarray(feature_maps, np.float64) @ np.asarray(kernel, np.float64) + np.asarray(bias, np.float64)


def evidence_maps(feature_maps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Each class's map of what speaks for it more than for the average class, [batch, h, w,
    classes]: F · (W[:, c] − mean_k W[:, k]). It is the class activation map less the mean of
    all classes' maps, less its constant bias part, which no location owns."""
    kernel = np.asarray(kernel, np.float64)
    return np.asarray(feature_maps, np.float64) @ (kernel - kernel.mean(axis=1, keepdims=True))


def grad_cam(feature_maps: np.ndarray, score: Callable, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM [batch, h, w] of `score` (a TensorFlow function pooled features [batch, channels]
    → class scores [batch, classes]) for each image's class in `classes`, on the given maps: the
    channels weighted by the spatial mean of the score's gradient, summed, the negative part
    dropped. Global average pooling is applied to the maps first, as the backbone does."""
    from headstart.infra.keras import tf

    maps = tf.constant(np.asarray(feature_maps, np.float32))
    with tf.GradientTape() as tape:
        tape.watch(maps)
        scores = score(tf.reduce_mean(maps, axis=[1, 2]))
        chosen = tf.gather(scores, np.asarray(classes, np.int64), axis=1, batch_dims=1)
    gradients = tape.gradient(chosen, maps)
    weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
    return tf.nn.relu(tf.reduce_sum(weights * maps, axis=-1)).numpy().astype(np.float64)


def centred_logits(kernel: np.ndarray, bias: np.ndarray) -> Callable:
    """The score `evidence_maps` maps, for Grad-CAM: the Dense head's logits less their mean."""
    from headstart.infra.keras import tf

    kernel, bias = tf.constant(kernel, tf.float32), tf.constant(bias, tf.float32)

    def score(pooled):
        logits = pooled @ kernel + bias
        return logits - tf.reduce_mean(logits, axis=1, keepdims=True)

    return score


def heatmap(evidence: np.ndarray) -> np.ndarray:
    """A map's positive part scaled to a peak of 1 (all zeros where nothing is positive)."""
    positive = np.maximum(np.asarray(evidence, np.float64), 0.0)
    peak = positive.max()
    return positive / peak if peak > 0 else positive


@dataclass
class Explanation:
    """One image, what the model made of it and where it looked: its pixels, its probabilities
    (from the same forward pass as the map), and the heatmap [h, w] of its predicted class."""

    path: str
    image: np.ndarray
    probabilities: np.ndarray
    heat: np.ndarray

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))


def explain_images(
    feature_map: Callable[[np.ndarray], np.ndarray], kernel: np.ndarray, bias: np.ndarray, paths: list[str]
) -> list[Explanation]:
    """Each image's probabilities under the Dense head (kernel, bias) and the heatmap of its
    predicted class, computed from one pass of the backbone's feature map per image (images of
    any size each go through on their own). Unreadable files raise; the caller checks them first."""
    explanations = []
    for path in paths:
        image = load_image(path)
        maps = feature_map(image[None].astype(np.float32) / 255.0)[0]
        logits = class_activation_maps(maps, kernel, bias).mean(axis=(0, 1))
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        predicted = int(np.argmax(probabilities))
        explanations.append(
            Explanation(str(path), image, probabilities, heatmap(evidence_maps(maps, kernel)[..., predicted]))
        )
    return explanations


def overlay(image: np.ndarray, heat: np.ndarray, side: int = OVERLAY_SIDE) -> np.ndarray:
    """The image scaled to fit side × side (small ones pixel by pixel), the heatmap stretched over
    all of it (the backbone saw the whole image resized to a square) with bilinear interpolation,
    coloured and blended in where it is warm: RGB uint8."""
    import matplotlib

    picture = Image.fromarray(np.asarray(image, np.uint8))
    enlarging = max(picture.size) < side
    picture = ImageOps.contain(
        picture, (side, side), Image.Resampling.NEAREST if enlarging else Image.Resampling.LANCZOS
    )
    width, height = picture.size
    stretched = np.asarray(
        Image.fromarray(np.asarray(heat, np.float32), mode="F").resize((width, height), Image.Resampling.BILINEAR)
    )
    stretched = np.clip(stretched, 0.0, 1.0)
    colours = matplotlib.colormaps[COLORMAP](stretched)[..., :3]
    # Blended in proportion to the heat, so that what the model did not look at stays as it is.
    opacity = HEAT_OPACITY * stretched[..., None]
    blended = (1 - opacity) * (np.asarray(picture, np.float64) / 255.0) + opacity * colours
    return np.round(blended * 255).astype(np.uint8)


def _figure_png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def overlay_png(explanation: Explanation, class_names: list[str], unsure: bool = False) -> bytes:
    """One image's overlay as a PNG, titled with the predicted class and its probability (marked
    unsure where the model's confidence threshold says so: the map is then of its best guess)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    predicted = explanation.predicted
    figure = plt.figure(figsize=(3.2, 3.5))
    axis = figure.add_axes((0, 0, 1, 0.88))
    axis.axis("off")
    axis.imshow(overlay(explanation.image, explanation.heat), interpolation="nearest")
    axis.set_title(
        f"{class_names[predicted]} ({explanation.probabilities[predicted]:.2f}{', unsure' if unsure else ''})\n"
        f"{Path(explanation.path).name}",
        fontsize=10,
    )
    return _figure_png(figure)


def overlay_grid_png(
    explanations: list[Explanation], labels: list[int] | np.ndarray, class_names: list[str], title: str
) -> bytes:
    """Overlays with 'predicted (probability) / true' captions, green when right, red when wrong,
    four to a row; 'none' for no image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(4, len(explanations)))
    rows = max(1, -(-len(explanations) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.5 * rows + 0.3), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, explanation, label in zip(axes.flat, explanations, labels):
        predicted = explanation.predicted
        axis.imshow(overlay(explanation.image, explanation.heat, 200), interpolation="nearest")
        axis.set_title(
            f"{class_names[predicted]} ({explanation.probabilities[predicted]:.2f})\ntrue: {class_names[int(label)]}",
            fontsize=9,
            color=RIGHT if predicted == int(label) else WRONG,
        )
    if not explanations:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center")
    figure.suptitle(title)
    return _figure_png(figure)
