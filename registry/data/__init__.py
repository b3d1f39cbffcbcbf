"""Datasets: the MVTec AD loader and the generated sample data."""
