"""Quality metrics with fixed, documented protocols (perplexity, similarity, agreement, accuracy, SQNR)."""
