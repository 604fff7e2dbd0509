"""Text data for the embedded model: the offline corpus and its BPE tokenizer."""
