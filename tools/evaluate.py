"""``python tools/evaluate.py ...`` (or under torchrun) is ``dist-cl-evaluate ...`` (dist_cl.cli.evaluate)."""

from dist_cl.cli.evaluate import run

if __name__ == "__main__":
    run()
