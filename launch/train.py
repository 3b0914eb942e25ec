"""Train dist_cl: ``torchrun --standalone --nproc_per_node=2 launch/train.py [--config PATH] [key=value ...]``.

Also runs as one plain ``python launch/train.py`` process. The command line is dist_cl.cli.train.main, which
``pip install`` also puts on the PATH as ``dist-cl-train``.
"""

from dist_cl.cli.train import run

if __name__ == "__main__":
    run()
