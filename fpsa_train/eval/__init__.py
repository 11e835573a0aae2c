"""Evaluation: how far a fine-tuned FP8 + tile-sparse model's videos stay from its reference, and whether they show
what the prompt asks (`python -m fpsa_train.evaluate`; the synthetic world's analyzer in `analyzer.py`)."""
