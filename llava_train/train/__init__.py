"""Training: stages, the Trainer subclass, checkpoints, and the steps launch/train.py runs."""
