"""Calibration data recipes and samples shipped with qtool (used by calibration methods)."""
