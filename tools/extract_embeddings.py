"""``python tools/extract_embeddings.py ...`` (or under torchrun) is ``dist-cl-extract-embeddings ...``
(dist_cl.extract_cli)."""

from dist_cl.extract_cli import run

if __name__ == "__main__":
    run()
