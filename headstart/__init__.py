"""headstart: transfer learning for image classification. The core library; it never imports Prefect."""

__version__ = "0.1.0"
