"""Close: the target, where scheduling links live."""
