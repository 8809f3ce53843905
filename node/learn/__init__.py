"""Learning together: local LoRA training, peer-to-peer distillation rounds, the LinUCB matchmaker."""
