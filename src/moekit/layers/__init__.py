"""Building blocks of the decoder: norms, rotary embeddings, attention, FFNs and the MoE layer."""
