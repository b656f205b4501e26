"""Ray Train (V2) loops that fit backbones, side-information models and transformations."""
