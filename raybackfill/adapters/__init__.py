"""Adapters: maps between two encoders' spaces fitted on a paired sample, without labels or a classifier.

- :mod:`~raybackfill.adapters.sample`: the paired sample (both encoders, one Ray Data pass);
- :mod:`~raybackfill.adapters.linear`: closed-form fits (Procrustes, ridge affine, low-rank affine), pure numpy;
- :mod:`~raybackfill.adapters.losses`: the label-free losses of trained adapters, pure torch;
- :mod:`~raybackfill.adapters.trained`: the FCT MLP, FastFill's head and psi trained on Ray Train;
- :mod:`~raybackfill.adapters.scores` and :mod:`~raybackfill.adapters.gate`: the held-out score and the gate;
- :mod:`~raybackfill.adapters.fit`: fit, score, keep the best and save it as a transformation artefact.
"""
