"""DatasetDDPM: a labeled dataset sampled from the diffusion model and labeled by the ensemble."""
