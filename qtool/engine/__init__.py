"""Execution engines that need more than one tensor at a time (block-wise calibration)."""
