"""What DRESS is measured against, built from the same models and training recipe: pruned, width-nested
(slimmable, HeteroFL, FjORD)."""
