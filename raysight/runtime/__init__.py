"""Runs an intervention graph against one forward pass in this process (torch only, no Ray)."""
