"""`headstart explain`: where a trained run's model looked in each image, as one overlay PNG per image."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from headstart.errors import HeadstartError
from headstart.evaluation.attention import explain_images, feature_map_function, overlay_png
from headstart.infra.storage import write_bytes_atomic
from headstart.registry.runs import Run
from headstart.serving.predict import UNSURE, list_images

OVERLAY_SUFFIX = ".cam.png"


@dataclass
class Explained:
    """What `explain_files` wrote: per image, its path, predicted label, probability and overlay
    file; and the inputs it skipped, with their reasons."""

    rows: list[tuple[str, str, float, Path]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def check_explainable(model: str) -> None:
    """A .tflite file is refused before anything loads: it keeps no feature map to look at."""
    if model.lower().endswith(".tflite"):
        raise HeadstartError(
            f"a .tflite file ({model}) holds no feature map to show where the model looked; "
            "give 'champion', a version or a run directory"
        )


def explain_files(run: Run, inputs: list[Path], output: Path) -> Explained:
    """One overlay per usable image among the inputs (files or folders), written to `output` as
    <image name>.cam.png (-2, -3, … where names repeat), each titled with the predicted class and
    its probability; labelled UNSURE, as `predict` labels it, below the confidence threshold the
    run was trained with (the map is then of its best guess). Unusable inputs are listed with their
    reason; none usable is a one-line error."""
    usable, skipped = list_images(inputs)
    if not usable:
        why = f" ({skipped[0]['path']}: {skipped[0]['reason']})" if skipped else ""
        raise HeadstartError(
            f"no image to explain in {', '.join(map(str, inputs))}{why}; give image files or folders holding images"
        )
    # The head first: model.keras is only read as numbers, and a file headstart did not write is
    # refused before any backbone loads.
    kernel, bias = run.head_weights()
    feature_map = feature_map_function(run.backbone)
    threshold = run.unsure_threshold
    explained = Explained(skipped=skipped)
    output = Path(output)
    taken: set[str] = set()
    for explanation in explain_images(feature_map, kernel, bias, [str(path) for path in usable]):
        name, count = Path(explanation.path).stem, 1
        while f"{name}{'' if count == 1 else f'-{count}'}{OVERLAY_SUFFIX}" in taken:
            count += 1
        file_name = f"{name}{'' if count == 1 else f'-{count}'}{OVERLAY_SUFFIX}"
        taken.add(file_name)
        predicted = explanation.predicted
        probability = float(explanation.probabilities[predicted])
        unsure = threshold is not None and probability < threshold
        destination = write_bytes_atomic(output / file_name, overlay_png(explanation, run.class_names, unsure))
        label = UNSURE if unsure else run.class_names[predicted]
        explained.rows.append((explanation.path, label, probability, destination))
    return explained
