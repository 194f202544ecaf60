"""The model: the 3D U-Net and its attention processors, the VAE, the text encoder, checkpoints and loading."""
