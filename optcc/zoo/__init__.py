"""Trained reference models (vit-digits, byte-llama) and their eval/calibration data."""
