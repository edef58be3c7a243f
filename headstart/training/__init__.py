"""Training: the new head on cached features, and fine-tuning the backbone's top stages with it."""
