"""``python tools/extract_embeddings.py ...`` (or under torchrun) is ``dist-cl-extract-embeddings ...``
(dist_cl.cli.extract_embeddings)."""

from dist_cl.cli.extract_embeddings import run

if __name__ == "__main__":
    run()
