"""Measuring a trained model: metrics, near-duplicates of training images, drift since the champion."""
