"""Models: image backbones, embedding transformations (FCT/FastFill forward, reverse psi), the side-info
model, the architecture registry and versioned artefacts (model.json + safetensors)."""
