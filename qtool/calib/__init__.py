"""Calibration: datasets -> token windows (data.py). Hooks that collect statistics from model
forward passes, and saving/loading them, arrive with `qtool calibrate`."""

from qtool.calib.data import CalibrationSet, Recipe, load_calibration, load_recipes, open_source, pick_windows

__all__ = ["CalibrationSet", "Recipe", "load_calibration", "load_recipes", "open_source", "pick_windows"]
