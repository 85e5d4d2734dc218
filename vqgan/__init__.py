"""vqgan: the frame tokenizer (taming-transformers VQGAN), loading TECO's published checkpoints."""
