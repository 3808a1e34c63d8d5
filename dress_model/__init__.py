"""DRESS: one backbone, many nested row-sparse subnets (Qu et al., arXiv 2207.00670)."""
