"""Measures of what a network has learned (torchmetrics Metrics), and how solve times scale over a grid."""
