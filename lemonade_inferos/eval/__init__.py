"""Quality measurement of KV plans: perplexity, KL divergence and top-1 agreement against full precision."""
