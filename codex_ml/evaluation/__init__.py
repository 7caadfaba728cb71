"""Evaluation of causal code LMs: bits per byte, accuracy, completion scores, with bootstrap CIs."""
