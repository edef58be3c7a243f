"""The model card (MODEL_CARD.md): what a run's model is, what it was trained on and how well it does,
in words, from the run's records and configuration values."""

from __future__ import annotations

from headstart.backbone.handles import Backbone
from headstart.registry.runs import CLASS_NAMES_FILE, DATA_REPORT_FILE, LABEL_ISSUES_FILE
from headstart.training.fine_tuning import FineTuningSummary


def near_duplicates_summary(near_duplicates: dict | None) -> str:
    """One paragraph on the test split's near-duplicates of training images (and validation's), for the
    card and the report."""
    if near_duplicates is None:
        return "Not checked."
    threshold, splits = near_duplicates["threshold"], near_duplicates["splits"]
    test = splits["test"]
    if not test["flagged"]:
        text = (
            "No test image has a near-duplicate in the training split: "
            f"none of the {test['images']} reaches a cosine similarity of {threshold} "
            "to its nearest training image (backbone features)."
        )
    else:
        without = test["accuracy_without_flagged"]
        without_text = (
            f"**{without:.4f}** on the other {test['n_without_flagged']}"
            if without is not None
            else "undefined (every test image is flagged)"
        )
        text = (
            f"**{test['flagged']}** of {test['images']} test images are near-duplicates of a training image "
            f"(cosine similarity of backbone features ≥ {threshold}; listed in `{DATA_REPORT_FILE}`): "
            f"test accuracy {test['accuracy']:.4f} with them, "
            f"{without_text} without them."
        )
    if "validation" in splits:
        validation = splits["validation"]
        text += f" Validation (early stopping): {validation['flagged']} of {validation['images']} images flagged."
    return text


def label_issues_section(summary: dict | None) -> str:
    """The card's section on the training images flagged as probably mislabelled; none where the
    run did not look for them."""
    if summary is None:
        return ""
    if not summary["flagged"]:
        text = f"None of the {summary['train_images']} training images is flagged as probably mislabelled."
    else:
        text = label_issues_summary(summary)
    return f"\n## Wrong labels in the training data\n{text}\n"


def label_issues_summary(summary: dict) -> str:
    """One paragraph on the flagged training images (some were flagged)."""
    return (
        f"**{summary['flagged']}** of {summary['train_images']} training images are flagged as probably mislabelled "
        f"(out-of-fold heads in {summary['folds']} folds, then confident learning; listed in `{LABEL_ISSUES_FILE}`, "
        "most likely first): "
        + (
            "the head was trained without them."
            if summary["left_out"]
            else "they were kept in training (`--drop-label-issues` leaves them out)."
        )
    )


def fine_tuning_line(config: dict, summary: FineTuningSummary | None) -> str:
    """The model card's line on fine-tuning, where it ran."""
    if summary is None:
        return ""
    augmentations = (
        ("horizontal flips", summary.flip),
        (
            f"shifts of up to {summary.shift:.0%} of the side ({summary.shift_cells} cells)",
            summary.shift_cells,
        ),
        (f"mixup (alpha {summary.mixup})", summary.mixup),
        (f"CutMix (alpha {summary.cutmix})", summary.cutmix),
    )
    augmentation = ", ".join(name for name, on in augmentations if on)
    return (
        f"\n- Fine-tuned: stages {summary.from_stage}–18 of the backbone, with the head, "
        f"on activations cached at their input "
        f"({'×'.join(map(str, summary.activation_shape))}, {summary.activation_dtype}); "
        f"{summary.epochs_run} epochs "
        f"(Adam, learning rate {config['fine_tune_learning_rate']} after a one-epoch warm-up, decaying on a cosine; "
        f"augmentation: {augmentation or 'none'}), "
        f"epoch {summary.best_epoch} kept: validation accuracy {summary.validation_accuracy_before:.4f} "
        f"with the head alone, "
        f"{summary.validation_accuracy_after:.4f} fine-tuned. Base backbone `{summary.base_backbone.handle}` "
        f"(fingerprint `{summary.base_backbone.fingerprint}`); "
        f"the stages below {summary.from_stage} are its own, unchanged."
        + (
            " The fine-tuned backbone averages the features of each image and of its mirror image."
            if summary.mirror_average
            else ""
        )
    )


def head_training_line(config: dict, metrics: dict, epochs: int) -> str:
    """How the head was fitted, with which settings, and whether a sweep chose them."""
    if config.get("solver") == "lbfgs":
        line = "fitted as a logistic regression by L-BFGS (L2, C = 1)"
    else:
        decay = f", weight decay {config['weight_decay']}" if config.get("weight_decay") else ""
        line = (
            f"trained for {epochs} epochs (learning rate {config['learning_rate']}{decay}, "
            f"batch size {config['batch_size']}, seed {config['seed']})"
        )
    if "sweep" in metrics:
        line += f", the best on the validation split of the {len(metrics['sweep'])} settings a sweep tried"
    return line


def balance_line(metrics: dict) -> str:
    """Balanced accuracy and the class weights the head was trained with, where the run has them."""
    if "balanced_accuracy" not in metrics:
        return ""
    line = f", balanced accuracy {metrics['balanced_accuracy']:.4f}"
    weights = metrics.get("class_weights")
    if weights:
        line += " (head trained with class weights " + ", ".join(f"{name} {w:.3f}" for name, w in weights.items()) + ")"
    return line


def calibration_line(metrics: dict) -> str:
    """How far the probabilities can be taken at their word, in one sentence; empty for a run from
    before calibration."""
    calibration = metrics.get("calibration")
    if calibration is None:
        return ""
    errors = f"expected calibration error on the test split {calibration['ece_before']:.4f}"
    if calibration.get("off"):
        return f"Not calibrated (--no-calibrate): {errors}."
    if not calibration.get("validation_images"):
        return f"Not calibrated (no validation images): {errors}."
    return (
        f"Temperature scaling (T = {calibration['temperature']:.3f}, fitted on the validation split): {errors} "
        f"before, {calibration['ece_after']:.4f} after."
    )


def unsure_summary(metrics: dict) -> str:
    """The "unsure" threshold the run's predictions use, and the coverage / accuracy trade-off as a table."""
    unsure = metrics.get("unsure")
    if unsure is None:
        return ""
    target = unsure["target_accuracy"]
    if target is None:
        chosen = "Predictions label every image (train with --target-accuracy, or predict with it, to say 'unsure')."
    elif unsure.get("threshold") is None:
        chosen = f"No threshold reached accuracy {target} on the validation split: predictions label every image."
    else:
        chosen = (
            f"Predictions say 'unsure' below confidence {unsure['threshold']:.4f}, chosen on the validation split "
            f"for accuracy {target} (there: {unsure['validation_coverage']:.1%} of images labelled, accuracy "
            f"{unsure['validation_accuracy']:.4f})."
        )
    rows = "\n".join(
        f"| {row['target_accuracy']} | {row['threshold']:.4f} | {row['test_coverage']:.1%} "
        f"| {row['test_accuracy']:.4f} |"
        if row["threshold"] is not None
        else f"| {row['target_accuracy']} | not reached | | |"
        for row in unsure["rows"]
    )
    return (
        f"{chosen}\n\n| target accuracy | threshold (validation) | test coverage | test accuracy |\n"
        f"|---|---|---|---|\n{rows}"
    )


def probabilities_section(metrics: dict) -> str:
    """The card's section on calibration and the unsure threshold; none for a run from before them."""
    if "calibration" not in metrics:
        return ""
    return f"## Probabilities\n{calibration_line(metrics)}\n\n{unsure_summary(metrics)}\n\n"


def model_card(
    config: dict,
    metrics: dict,
    data_report: dict,
    backbone: Backbone,
    history: dict,
    engine: str,
    fine_tuning: FineTuningSummary | None = None,
) -> str:
    """The card of a run from its configuration values, test metrics, data report (with its
    near-duplicates, where checked), backbone, head history, feature engine and fine-tuning."""
    counts = data_report["counts"]
    split_lines = "\n".join(
        f"| {split} | "
        + " | ".join(str(counts[split][name]) for name in data_report["class_names"])
        + f" | {sum(counts[split].values())} |"
        for split in ("train", "validation", "test")
    )
    per_class = "\n".join(
        f"| {name} | {values['precision']:.4f} | {values['recall']:.4f} | {values['f1']:.4f} | {values['support']} |"
        for name, values in metrics["per_class"].items()
    )
    state = "fine-tuned" if fine_tuning is not None else "frozen"
    side, classes, epochs = backbone.image_size, len(data_report["class_names"]), len(history.get("loss", []))
    training = head_training_line(config, metrics, epochs)
    tuned = fine_tuning_line(config, fine_tuning)
    notes = "".join(f"\n- {note}" for note in data_report["notes"])
    return f"""# Model card

An image classifier for {", ".join(data_report["class_names"])}, trained by headstart.

## Model
- Backbone: `{backbone.handle}` (fingerprint `{backbone.fingerprint}`), {state}, ImageNet-pretrained; \
input {side}×{side} px.
- Head: Dropout({config["dropout"]}) → Dense({classes}, softmax), {training}, on features from the \
{engine} engine.{tuned}
- Input: RGB images of any size, pixel values 0–255; output: one probability per class in the order of \
`{CLASS_NAMES_FILE}`.

## Data
Source: `{data_report["source"]}`. Splits are assigned by image content hash and never change between runs.

| split | {" | ".join(data_report["class_names"])} | total |
|---|{"---|" * len(data_report["class_names"])}---|
{split_lines}

{len(data_report["skipped"])} files were skipped (see `{DATA_REPORT_FILE}`).{notes}

## Evaluation on the test split
Accuracy **{metrics["accuracy"]:.4f}** on {metrics["n"]} images, macro F1 {metrics["macro_f1"]:.4f}\
{balance_line(metrics)}.

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

{probabilities_section(metrics)}## Near-duplicates of training images
{near_duplicates_summary(data_report.get("near_duplicates"))}
{label_issues_section(metrics.get("label_issues"))}
## Limits
The backbone saw ImageNet photos; images far from that (medical scans, drawings, tiny \
thumbnails upscaled from {backbone.image_size} px or less) may classify worse than these figures. \
Accuracy is measured on held-out images of the same source, not on the world at large.
"""
