"""mriseg: brain MRI tumour segmentation from one command line."""

__version__ = "0.1.0"
