"""GRAM training tools: codes from attributes, training pairs, joint SFT, co-alignment DPO,
S_rele weights, export. See docs/TRAINING.md."""
