"""Training: optimizer and schedule (optim.py), the one training loop (loop.py), metrics (metrics.py),
and the pretraining driver (pretrain.py) that fine-tuning modes reuse."""
