"""Compatibility: the losses of BCT, RACT, FCT, FastFill and metric-compatible training (pure tensor
math), and the per-method recipe saying what each method trains and how it serves queries."""
