"""Evaluation on features: probes (ridge, logistic, kNN, few-shot) and the protocols a run asks for."""
