"""Prediction (averaging weight samples) and evaluation (metrics, per-example files, plots)."""
