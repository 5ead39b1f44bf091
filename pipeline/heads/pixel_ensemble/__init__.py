"""The paper's head: an ensemble of small pixel MLPs trained on sampled labeled pixels."""
