"""Data layer: readers for every layout, synthetic data, preprocessing and the .npy cache."""
