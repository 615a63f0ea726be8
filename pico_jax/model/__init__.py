"""Model definitions in Flax NNX: the FLUX transformer, attention (with hooks), LoRA, autoencoder, text encoders."""
