"""Data: pretraining corpora, token blocks, MLM masking, and fine-tuning task data."""
