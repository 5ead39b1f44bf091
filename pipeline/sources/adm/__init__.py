"""guided-diffusion ("ADM") checkpoints: safe reading, conversion to diffusers, block numbers."""
