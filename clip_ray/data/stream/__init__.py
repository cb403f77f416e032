"""The training and evaluation streams on Ray Data: what training workers iterate over."""
