"""Federated continual sequential recommendation (SASRec + FCUCR) on MovieLens-100K."""
