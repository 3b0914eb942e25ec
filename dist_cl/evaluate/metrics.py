"""Evaluation metrics: positive-pair retrieval (the paper's metric), recall@k (image<->text for image–caption
pairs) and kNN classification.

The metrics are pure functions of embeddings; ``evaluate`` embeds the data sharded over ranks, one rank
applies them and every rank returns its numbers.
"""

import numpy as np
import torch

from dist_cl.evaluate.corrupted_retrieval import corrupted_retrieval
from dist_cl.evaluate.embed import embed_indices
from dist_cl.learn.models import ImageTextModel
from dist_cl.runtime.distributed import distributed_map

EVAL_EPOCH = 2**31 - 1
"""Augmentation epoch of the held-out pairs: the same views at every evaluation of every run."""


BLOCK_ELEMENTS = 1 << 25
"""Similarities held at once (256 MiB of float64): the metrics run over row blocks, so ImageNet-size
splits (50k held-out against 1.28M training rows) never build the full similarity matrix."""


def _row_blocks(n_rows: int, n_columns: int, block_elements: int) -> list[slice]:
    rows = max(1, block_elements // max(n_columns, 1))
    return [slice(start, min(start + rows, n_rows)) for start in range(0, n_rows, rows)]


def _partner_hits(queries: torch.Tensor, keys: torch.Tensor, k: int, block_elements: int) -> torch.Tensor:
    """For each query row i: whether key row i is among its top-k keys by inner product."""
    hits = []
    for rows in _row_blocks(len(queries), len(keys), block_elements):
        top = (queries[rows] @ keys.T).topk(k, dim=1).indices
        hits.append((top == torch.arange(rows.start, rows.stop)[:, None]).any(1))
    return torch.cat(hits)


def partner_recall(queries: torch.Tensor, keys: torch.Tensor, k: int = 1,
                   block_elements: int = BLOCK_ELEMENTS) -> float:
    """Fraction of query rows i whose key row i is among their top-k keys by inner product (one direction)."""
    k = min(k, len(keys))
    return float(_partner_hits(queries.double(), keys.double(), k, block_elements).double().mean())


def retrieval_recall(a: torch.Tensor, b: torch.Tensor, k: int = 1, block_elements: int = BLOCK_ELEMENTS) -> float:
    """Fraction of rows whose partner is among the top-k by inner product, mean of a->b and b->a."""
    return (partner_recall(a, b, k, block_elements) + partner_recall(b, a, k, block_elements)) / 2


IMAGE_TEXT_RECALLS = (1, 5, 10)
"""The k of image->text and text->image recall@k, as CLIP's retrieval benchmarks report them."""


def image_text_recalls(images: torch.Tensor, texts: torch.Tensor) -> dict:
    """``image_to_text_r{k}`` and ``text_to_image_r{k}``: each direction on its own, since a caption may fit
    many images (and their retrieval be asymmetric) where two views of one image are exchangeable."""
    values = {}
    for k in IMAGE_TEXT_RECALLS:
        values[f"image_to_text_r{k}"] = partner_recall(images, texts, k)
        values[f"text_to_image_r{k}"] = partner_recall(texts, images, k)
    return values


def knn_top1(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, k: int,
             block_elements: int = BLOCK_ELEMENTS) -> float:
    """Cosine kNN: majority label of the k nearest training rows (ties to the nearest such label)."""
    train_x = torch.nn.functional.normalize(train_x.double(), dim=1)
    test_x = torch.nn.functional.normalize(test_x.double(), dim=1)
    k = min(k, len(train_x))
    nearest = np.concatenate([(test_x[rows] @ train_x.T).topk(k, dim=1).indices.numpy()
                              for rows in _row_blocks(len(test_x), len(train_x), block_elements)])
    votes = np.asarray(train_y)[nearest]
    predictions = []
    for row in votes:
        counts = np.bincount(row)
        winners = np.flatnonzero(counts == counts.max())
        predictions.append(next(label for label in row if label in winners))
    return float((np.asarray(predictions) == np.asarray(test_y)).mean())


ZERO_SHOT_TEMPLATE = "a picture of {}"
"""The prompt of each class name for zero-shot classification (CLIP's prompt idea, one generic template)."""


def zero_shot_top1(images: torch.Tensor, prompts: torch.Tensor, labels: np.ndarray) -> float:
    """Fraction of images whose most similar prompt (one row per class, by inner product) is their class's."""
    predictions = (images.double() @ prompts.double().T).argmax(1).numpy()
    return float((predictions == np.asarray(labels)).mean())


@torch.no_grad()
def class_prompts(model, dataset, device) -> torch.Tensor:
    """The text tower's embedding of ZERO_SHOT_TEMPLATE for each of ``dataset.classes``, tokenised as its
    captions are."""
    tokens = torch.stack([dataset.tokenizer(ZERO_SHOT_TEMPLATE.format(name.lower())) for name in dataset.classes])
    was_training = model.training
    model.eval()
    prompts = model.embed(tokens.to(device), side="b").float().cpu()
    model.train(was_training)
    return prompts


def full_batch_loss(u: torch.Tensor, v: torch.Tensor, tau: float, block_elements: int = BLOCK_ELEMENTS) -> float:
    """The symmetric InfoNCE of all pairs as one batch (dist_cl.learn.losses.batch_infonce), over row blocks:
    row log-sum-exps per block, column log-sum-exps accumulated across blocks."""
    u, v = u.double(), v.double()
    row_terms = torch.zeros((), dtype=torch.float64)
    column_lse = torch.full((len(v),), float("-inf"), dtype=torch.float64)
    for rows in _row_blocks(len(u), len(v), block_elements):
        s = u[rows] @ v.T / tau
        row_terms += s.logsumexp(1).sum()
        column_lse = torch.logaddexp(column_lse, s.logsumexp(0))
    positives = (u * v).sum(1) / tau
    return float((row_terms + column_lse.sum() - 2 * positives.sum()) / len(u))


def train_pair_indices(num_samples: int, max_pairs: int) -> np.ndarray:
    """The training pairs the training-set metrics are taken over: all of them, or beyond ``max_pairs`` a
    fixed random subset of that many (the same at every evaluation of every run)."""
    if num_samples <= max_pairs:
        return np.arange(num_samples)
    return np.sort(np.random.default_rng(EVAL_EPOCH).choice(num_samples, max_pairs, replace=False))


def pair_metrics(u: torch.Tensor, v: torch.Tensor, tau: float) -> dict:
    """Positive-pair retrieval top-1 / recall@5 and the full-batch loss of the pairs (u_i, v_i)."""
    return {
        "retrieval_top1": retrieval_recall(u, v, 1),
        "retrieval_recall5": retrieval_recall(u, v, 5),
        "full_batch_loss": full_batch_loss(u, v, tau),
    }


def evaluate(model, train_set, heldout_set, *, rank: int, world_size: int, device, knn_k: int, tau: float,
             train_pairs: int = 100_000, probe: bool = False, corruptions: bool = False, corruption_samples: int = 0,
             num_workers: int = 0) -> dict:
    """The paper's metrics on fixed-seed views (augmentation epoch EVAL_EPOCH).

    On the held-out pairs (the training pairs where there are none, as in the synthetic setting):
    retrieval top-1 / recall@5, the full-batch loss L(all pairs), and with labels kNN top-1 on backbone
    features (the image tower's), and with ``probe`` a linear probe on them; for image–caption pairs also
    image->text and text->image recall@1/5/10, and where the classes have names, zero-shot top-1
    (ZERO_SHOT_TEMPLATE).
    On the training pairs (``train_*``; at most ``train_pairs`` of them, their number logged as
    ``train_pairs``): the full-batch loss, the objective the paper's theory is about, and retrieval top-1,
    its "original data" metric. ``corruptions`` adds corrupted-view retrieval over ``corruption_samples`` of
    the held-out images (dist_cl.evaluate.corrupted_retrieval).

    A collective. Every rank embeds its share (``num_workers`` loader workers each); the float64 metrics
    are computed once, by one rank, and sent to the others.
    """
    common = dict(rank=rank, world_size=world_size, device=device, num_workers=num_workers)
    image_text = isinstance(model, ImageTextModel)  # u = image, v = caption
    train_idx = train_pair_indices(len(train_set), train_pairs)
    train_set.set_epoch(EVAL_EPOCH)
    train_pair = embed_indices(model, train_set, train_idx, augmented=True, **common)
    heldout_pair, features, prompts = None, None, None
    if heldout_set is not None:
        heldout_set.set_epoch(EVAL_EPOCH)
        idx = np.arange(len(heldout_set))
        heldout_pair = embed_indices(model, heldout_set, idx, augmented=True, **common)
        if heldout_set.labels is not None and train_set.labels is not None:
            train_x, _ = embed_indices(model, train_set, np.arange(len(train_set)), output="backbone",
                                       side_b=False, **common)
            test_x, _ = embed_indices(model, heldout_set, idx, output="backbone", side_b=False, **common)
            features = train_x, test_x
        if image_text and heldout_set.labels is not None and heldout_set.classes:
            prompts = class_prompts(model, heldout_set, device)

    def metrics(_) -> dict:
        train = pair_metrics(*train_pair, tau)
        values = {"train_full_batch_loss": train["full_batch_loss"], "train_retrieval_top1": train["retrieval_top1"],
                  "train_pairs": len(train_idx)}
        values.update(pair_metrics(*heldout_pair, tau) if heldout_pair is not None else train)
        if image_text:
            values.update(image_text_recalls(*(heldout_pair if heldout_pair is not None else train_pair)))
        if features is not None:
            values["knn_top1"] = knn_top1(features[0], train_set.labels, features[1], heldout_set.labels, knn_k)
            if probe:
                values["probe_top1"] = linear_probe_top1(features[0].cpu().numpy(), train_set.labels,
                                                         features[1].cpu().numpy(), heldout_set.labels)
        if prompts is not None:
            values["zero_shot_top1"] = zero_shot_top1(heldout_pair[0], prompts, heldout_set.labels)
        return values

    [values] = distributed_map(metrics, [None])
    if corruptions:
        values.update(corrupted_retrieval(model, heldout_set, corruption_samples, epoch=EVAL_EPOCH, rank=rank,
                                          world_size=world_size, device=device))
    return values


def linear_probe_top1(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
    C: float = 1.0, max_iter: int = 1000, seed: int = 0,
) -> float:
    """Top-1 accuracy of a multinomial logistic regression fit on frozen training features.

    Features are standardised with the training split's mean and standard deviation (lbfgs converges
    poorly on raw ReLU features of very different scales); the test split only ever sees those statistics.
    """
    # scikit-learn is imported here so a trainer that does not probe does not pay for the import
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, test_x = np.asarray(train_x, dtype=np.float64), np.asarray(test_x, dtype=np.float64)
    scaler = StandardScaler().fit(train_x)
    probe = LogisticRegression(C=C, max_iter=max_iter, random_state=seed)
    probe.fit(scaler.transform(train_x), np.asarray(train_y))
    return float((probe.predict(scaler.transform(test_x)) == np.asarray(test_y)).mean())
