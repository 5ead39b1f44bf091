"""Mask-prior refinement (DDPS): a diffusion model over label maps that cleans an ensemble's predictions.

`mask_diffusion` is the forward process over one-hot label maps, `denoiser` the small
time-conditioned network that predicts the clean map, `conditioning` what it sees of the image
(the ensemble's probabilities and a projection of the pixel features), `training` fits it on
out-of-fold predictions of the labeled images, and `refining` applies it to a predictions folder.
"""
