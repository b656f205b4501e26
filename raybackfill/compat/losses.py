"""Losses of the compatible-upgrade methods, as pure functions on tensors. Each docstring gives its formula,
after the papers: BCT (Shen et al., CVPR 2020), RACT (Zhang et al., ICLR 2022), FCT (Ramanujan et al., CVPR
2022), FastFill (Jaeckle et al., ICLR 2023), metric-compatible online backfilling (Seo et al., WACV 2025).

Conventions: features are (N, d) rows, labels (N,) int64. Whatever is frozen by the method (old
features, old/new classifiers, the target new embedding) is detached *inside* the loss, so a caller
cannot train it by mistake. All losses are means over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """L = mean_i CE(logits_i, y_i), with targets (1 - eps) one-hot + eps / C when smoothing by eps."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def _check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    if labels.numel() and int(labels.max()) >= num_classes:
        raise ValueError(
            f"label {int(labels.max())} has no row in the {what} ({num_classes} classes); "
            "synthesize rows for new classes with synthesize_old_classifier"
        )


def bct_influence_loss(
    new_features: torch.Tensor,
    labels: torch.Tensor,
    old_classifier_weight: torch.Tensor,
    old_classifier_bias: torch.Tensor | None,
) -> torch.Tensor:
    """BCT's influence loss: L = mean_i CE(W_old phi_new(x_i) + b_old, y_i), W_old and b_old frozen.

    Training the new features to be classified by the old classifier puts them in the old space. Every
    label needs a row in W_old (see :func:`synthesize_old_classifier`). The full BCT objective is
    ``classification_loss(new logits) + lambda * bct_influence_loss(...)`` with lambda = 1.
    """
    weight = old_classifier_weight.detach()
    bias = None if old_classifier_bias is None else old_classifier_bias.detach()
    _check_labels(labels, weight.shape[0], "old classifier")
    return F.cross_entropy(F.linear(new_features, weight, bias), labels)


def synthesize_old_classifier(
    old_weight: torch.Tensor,
    old_bias: torch.Tensor | None,
    old_features: torch.Tensor,
    labels: torch.Tensor,
    num_classes_new: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend the old classifier to ``num_classes_new`` classes, BCT's way for classes it never saw.

    Rows 0..K_old-1 are the old rows; row c >= K_old points along m_c = mean{phi_old(x_i) : y_i = c} (the
    mean old feature of class c) with bias 0, scaled to the mean norm of the trained rows:
    w_c = m_c * mean_j ||w_j|| / ||m_c||. Why the scale: unnormalised features are often ~10x longer than
    classifier rows, and rows that long dominate every logit, so the influence loss would push the new
    features away from the old classes' rows instead of into the old space. Returns detached
    (weight (C_new, d), bias (C_new,)).
    """
    old_classes, dim = old_weight.shape
    if num_classes_new < old_classes:
        raise ValueError(f"num_classes_new={num_classes_new} is below the old classifier's {old_classes} classes")
    if old_features.shape[1] != dim:
        raise ValueError(f"old features have dim {old_features.shape[1]}, the old classifier {dim}")
    weight = old_weight.detach().new_zeros(num_classes_new, dim)
    weight[:old_classes] = old_weight.detach()
    bias = weight.new_zeros(num_classes_new)
    if old_bias is not None:
        bias[:old_classes] = old_bias.detach()
    new_classes = torch.arange(old_classes, num_classes_new, device=labels.device)
    missing = [int(c) for c in new_classes if not bool((labels == c).any())]
    if missing:
        raise ValueError(f"no old features for new classes {missing[:10]}: cannot synthesize their rows")
    row_norm = old_weight.detach().norm(dim=1).mean()
    for c in new_classes.tolist():
        mean = old_features.detach()[labels == c].mean(0)
        weight[c] = mean * (row_norm / mean.norm().clamp_min(1e-12))
    return weight, bias


def ract_loss(
    new: torch.Tensor, old: torch.Tensor, labels: torch.Tensor, tau: float = 0.01, k: int = 10
) -> torch.Tensor:
    """RACT's regression-alleviating compatible loss (n, o = L2-normalised new and old features, o frozen):

        L_i = -log( e^{n_i.o_i/tau} / ( e^{n_i.o_i/tau} + sum_{j in topK_o(i)} e^{n_i.o_j/tau}
                                                        + sum_{j in topK_n(i)} e^{n_i.n_j/tau} ) )

    topK_o(i) / topK_n(i): the k largest n_i.o_j / n_i.n_j over j with y_j != y_i (so j != i); fewer
    when the batch has fewer negatives. The new-to-old positive must beat old AND new negatives, which
    is what prevents negative flips in a gallery mixing old and new embeddings. L = mean_i L_i.
    """
    n = F.normalize(new, dim=1)
    o = F.normalize(old.detach(), dim=1)
    positive = (n * o).sum(1, keepdim=True) / tau
    same_label = labels[:, None] == labels[None, :]
    top = min(k, n.shape[0])
    new_to_old = (n @ o.T / tau).masked_fill(same_label, float("-inf")).topk(top, dim=1).values
    new_to_new = (n @ n.T / tau).masked_fill(same_label, float("-inf")).topk(top, dim=1).values
    logits = torch.cat([positive, new_to_old, new_to_new], dim=1)
    return (torch.logsumexp(logits, dim=1) - positive.squeeze(1)).mean()


def fct_loss(new_features: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
    """FCT: L = mean_{i,d} (phi_new(x_i)_d - h_i_d)^2; the new features are the frozen target."""
    return F.mse_loss(transformed, new_features.detach())


def fastfill_item_loss(
    h: torch.Tensor,
    target_new: torch.Tensor,
    labels: torch.Tensor,
    new_classifier_weight: torch.Tensor,
    new_classifier_bias: torch.Tensor | None,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """FastFill's per-item error ``L_i = mean_d (phi_new(x_i)_d - h_i_d)^2 + CE_eps(W_new h_i + b_new, y_i)``,
    shape (N,): what the uncertainty head learns to predict, and so the order a perfect head would give.
    W_new, b_new and phi_new are frozen; CE_eps uses label smoothing eps."""
    weight = new_classifier_weight.detach()
    bias = None if new_classifier_bias is None else new_classifier_bias.detach()
    _check_labels(labels, weight.shape[0], "new classifier")
    return ((target_new.detach() - h) ** 2).mean(1) + F.cross_entropy(
        F.linear(h, weight, bias), labels, label_smoothing=label_smoothing, reduction="none"
    )


def fastfill_loss(
    h: torch.Tensor,
    s: torch.Tensor,
    target_new: torch.Tensor,
    labels: torch.Tensor,
    new_classifier_weight: torch.Tensor,
    new_classifier_bias: torch.Tensor | None,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """FastFill's uncertainty-weighted alignment loss, ``mean_i [ 0.5 * exp(-s_i) * L_i + 0.5 * s_i ]`` with
    L_i from :func:`fastfill_item_loss`.

    s_i is the predicted log-variance: items the transformation cannot fit learn a high s_i (their
    L_i is down-weighted at the price of 0.5 s_i), which is the backfill priority.
    """
    per_item = fastfill_item_loss(h, target_new, labels, new_classifier_weight, new_classifier_bias, label_smoothing)
    s = s.reshape(-1)
    return (0.5 * torch.exp(-s) * per_item + 0.5 * s).mean()


def metric_compatible_loss(
    psi_new: torch.Tensor, old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, tau: float = 0.05
) -> torch.Tensor:
    """Supervised contrastive loss that puts old-space and new-space similarities on one scale (after Seo et al.,
    with one more block of candidates, c below).

    During a rank-merge backfill a query scores the old part with q_old = psi(phi_new(q)) against old
    embeddings and the new part with q_new = phi_new(q) against new embeddings, and the two lists are
    merged by score. So for each anchor i the candidates are all three kinds of score, in ONE softmax
    (p = normalised psi_new, o = normalised old (frozen), n = normalised new; all divided by tau):

        a_ij = p_i.o_j  for all j        (what the old part of the index returns)
        b_ij = n_i.n_j  for j != i       (what the new part returns)
        c_ij = p_i.p_j  for j != i       (psi outputs of other items)

    P_i = the candidates with y_j = y_i (a_ii always), A_i = all candidates, and

        L_i = -1/|P_i| sum_{p in P_i} ( p - log sum_{a in A_i} e^{a} ),   L = mean_i L_i.

    Old-space negatives compete with new-space positives and vice versa, so a wrong item from either
    part can only outrank a right one from the other if it outranks it in this softmax, which the loss
    penalises: that is what keeps the merge free of negative flips. ``old`` is detached; gradients
    reach ``psi_new`` and ``new`` (detach ``new`` when the new model is frozen). Cosine similarity;
    for an L2 index on normalised vectors the ranking is the same.

    Deviation from the paper, whose candidates are a and b only: c also pulls the psi outputs of one class
    together and pushes other classes' away, so psi(new query) lands in old-space clusters the way old
    queries do. Against the paper's two blocks, on the built-in data over several data and training seeds,
    it retrieves better from the old gallery (psi query / old gallery top-1 and mAP) and does not lower the
    rank merge's backfill areas; ``python -m benchmarks.psi_candidates`` measures both on finished demos.
    """
    p = F.normalize(psi_new, dim=1)
    o = F.normalize(old.detach(), dim=1)
    n = F.normalize(new, dim=1)
    count = p.shape[0]
    self_pair = torch.eye(count, dtype=torch.bool, device=p.device)
    same_label = labels[:, None] == labels[None, :]
    scores = (
        torch.cat(
            [p @ o.T, (n @ n.T).masked_fill(self_pair, float("-inf")), (p @ p.T).masked_fill(self_pair, float("-inf"))],
            dim=1,
        )
        / tau
    )
    positives = torch.cat([same_label, same_label & ~self_pair, same_label & ~self_pair], dim=1)
    log_prob = scores - torch.logsumexp(scores, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1))
    return per_anchor.mean()


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """SimCLR's NT-Xent over 2N views (z1[i], z2[i] are two augmentations of image i), z normalised:

    l(a, b) = -log( e^{z_a.z_b/tau} / sum_{m != a} e^{z_a.z_m/tau} ),
    L = 1/(2N) sum_i [ l(i, N+i) + l(N+i, i) ].
    """
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    count = z1.shape[0]
    scores = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    partner = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(z.device)
    return F.cross_entropy(scores, partner)
