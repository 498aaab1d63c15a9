"""From codes and hidden states to one row per text: pooling, binarization, TF-IDF."""
