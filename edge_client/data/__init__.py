"""Datasets: the shipped ETTh1 file and the readers of every dataset fedge uses (never downloaded at run time)."""
