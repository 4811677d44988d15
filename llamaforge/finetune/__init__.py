"""Fine-tuning: training data in the Llama 2 chat format (the trainer itself is still to come)."""
