"""The head fitted as a multinomial logistic regression by L-BFGS: the classic baseline for
features from a frozen network (scikit-learn's `LogisticRegression()` with its defaults: L2 on the
kernel, C = 1, the bias free), on the whole train split at once."""

from __future__ import annotations

import numpy as np

from headstart.features.streams import FeatureStream, InMemoryFeatures

# L-BFGS iterations at most: the loss is convex, and converges well within them on 1 280 features.
MAX_ITERATIONS = 500


def fit_logistic_regression(
    classifier,
    train: "FeatureStream | InMemoryFeatures | tuple[np.ndarray, np.ndarray]",
    validation: "FeatureStream | InMemoryFeatures | tuple[np.ndarray, np.ndarray] | None",
    class_weights: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """Sets the classifier's Dense kernel and bias to the logistic regression's (the softmax of
    Dense is exactly its model; Dropout is off at inference) and returns a one-step history in
    train_head's form. The train split is read into memory: 1 280 float32 features per image."""
    from scipy.optimize import minimize

    from headstart.training.head import HEAD_DENSE

    features, labels = in_memory(train)
    num_classes = int(classifier.get_layer(HEAD_DENSE).get_weights()[1].shape[0])
    dimension = features.shape[1]
    weights = np.ones(len(labels)) if class_weights is None else np.asarray(class_weights, np.float64)[labels]
    targets = np.eye(num_classes)[labels]

    def loss_and_gradient(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        kernel, bias = parameters[:-num_classes].reshape(dimension, num_classes), parameters[-num_classes:]
        logits = features @ kernel + bias
        logits -= logits.max(axis=1, keepdims=True)
        log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -(weights * log_probabilities[np.arange(len(labels)), labels]).sum() + 0.5 * (kernel**2).sum()
        error = (np.exp(log_probabilities) - targets) * weights[:, None]
        return loss, np.concatenate([(features.T @ error + kernel).ravel(), error.sum(axis=0)])

    start = np.zeros(dimension * num_classes + num_classes)
    solution = minimize(loss_and_gradient, start, jac=True, method="L-BFGS-B", options={"maxiter": MAX_ITERATIONS}).x
    kernel, bias = solution[:-num_classes].reshape(dimension, num_classes), solution[-num_classes:]
    classifier.get_layer(HEAD_DENSE).set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
    history = dict(zip(("loss", "accuracy"), ([value] for value in score(classifier, (features, labels)))))
    if validation is not None:
        validation = in_memory(validation)
        if len(validation[1]):
            history |= dict(zip(("val_loss", "val_accuracy"), ([value] for value in score(classifier, validation))))
    return history


def score(classifier, split: "tuple[np.ndarray, np.ndarray]") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the classifier's head on features and labels."""
    from headstart.training.head import head_logits

    features, labels = split
    logits = head_logits(classifier, features)
    return cross_entropy(logits, labels), float((logits.argmax(axis=1) == labels).mean())


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits - logits.max(axis=1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(-log_probabilities[np.arange(len(labels)), labels].mean())


def in_memory(split) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(split, tuple):
        return np.asarray(split[0], np.float64), np.asarray(split[1], np.int64)
    chunks = list(split.chunks())
    if not chunks:
        return np.zeros((0, 0)), np.zeros(0, np.int64)
    return (
        np.concatenate([features for features, _ in chunks]).astype(np.float64),
        np.concatenate([labels for _, labels in chunks]).astype(np.int64),
    )
