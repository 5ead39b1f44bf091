"""Feature sources: models (or raw pixels) that turn a batch of images into named feature maps."""
