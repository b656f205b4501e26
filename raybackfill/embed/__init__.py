"""Ray Data actor pools that embed images (backbones, side-info) and transform stored embeddings."""
