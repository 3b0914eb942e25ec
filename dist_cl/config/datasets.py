"""The data sets as plain data: what each ``data.name`` reads from the config and the facts about it that the
config's rules need, declared once.

The schema of the ``data`` section beside its dataclass (dist_cl.config.schema.DataConfig): a module importing
nothing, so that validation can refuse a key the chosen data set ignores, or a ``model.in_chans`` its images
do not have, before any data is read. The loaders (dist_cl.data) read their facts from here rather than
repeating them: dist_cl.data.digits checks the images it loads against ``samples``.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Dataset:
    reads: tuple[str, ...] = ()
    """The ``data.*`` keys it reads besides those every data set reads (name, split_seed, num_workers, augment);
    under another ``data.name`` such a key must stay at its default."""
    images: bool = True
    """False: it has no images (free embeddings), so no image model and nothing to corrupt."""
    captions: bool = False
    """True: its second view is a caption's token ids, not an image: it trains with ``model.text_tower``, and
    only it does."""
    channels: int | None = None
    """Channels of its images, which ``model.in_chans`` must equal; None: the data says (shards)."""
    samples: int | None = None
    """Its fixed number of images, where it has one, split by ``data.holdout_fraction``."""
    classes: int | None = None
    """Its number of classes, where it is fixed: each split needs one image of each at least."""
    image_shape: tuple[int, int] | None = None
    """Height and width of its images, where they are fixed: files of another shape are another data set."""


DATASETS = {
    "digits": Dataset(reads=("holdout_fraction",), channels=1, samples=1797, classes=10),
    "synthetic": Dataset(reads=("num_samples",), images=False),
    "shards": Dataset(reads=("path", "image_size")),
    "captions": Dataset(reads=("path", "image_size"), captions=True),
    "fashion_mnist": Dataset(reads=("path", "image_size", "subset", "heldout_subset"), channels=1, classes=10,
                             image_shape=(28, 28)),
}
"""Every ``data.name`` and its declaration; dist_cl.data.build_dataset binds each name to its loader."""
