"""pid-batch: batch decoding of image-generator latents with the PiD pixel-diffusion decoder."""

__version__ = "0.1.0"
