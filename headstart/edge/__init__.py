"""Models for phones and boards: .tflite export, float32 and int8."""
