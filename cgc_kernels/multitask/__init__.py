"""The N in 1+N: task affinity and clustering, the equal-budget method comparison, and the
training recipe they share."""
