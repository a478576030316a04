"""Self-scaling: find the minimal network by altering it one decision at a time (thesis 2.4)."""
