"""What DRESS is measured against, built from the same models and training step: pruned, slimmable."""
