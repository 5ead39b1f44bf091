"""A segmenter trained on images and label maps (DatasetDDPM's distilled model): no diffusion model at test time."""
