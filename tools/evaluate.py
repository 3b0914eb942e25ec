"""``python tools/evaluate.py ...`` (or under torchrun) is ``dist-cl-evaluate ...`` (dist_cl.evaluate_cli)."""

from dist_cl.evaluate_cli import run

if __name__ == "__main__":
    run()
