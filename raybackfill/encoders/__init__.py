"""Encoders: every model that embeds gallery rows, whatever it came from, behind one interface.

- :mod:`~raybackfill.data.preprocessing`: images of any size/mode and texts -> model inputs (no torch).
- :mod:`~raybackfill.encoders.encoder`: :func:`load_encoder` for every
  :class:`~raybackfill.types.EncoderKind`, with entrypoint trust.
- :mod:`~raybackfill.encoders.register`: make an artefact from a TorchScript file, a ``.pt2`` program, a
  torchvision architecture with its weights, or a user entrypoint.
"""

from raybackfill.data.preprocessing import ImagePreprocessing, Prepared, TextPreprocessing
from raybackfill.encoders.encoder import (
    Encoder,
    EntrypointTrust,
    UntrustedEntrypointError,
    check_trusted,
    encoder_preprocessing,
    load_encoder,
)
from raybackfill.encoders.register import EncoderSource, register_encoder

__all__ = [
    "Encoder",
    "EncoderSource",
    "EntrypointTrust",
    "ImagePreprocessing",
    "Prepared",
    "TextPreprocessing",
    "UntrustedEntrypointError",
    "check_trusted",
    "encoder_preprocessing",
    "load_encoder",
    "register_encoder",
]
