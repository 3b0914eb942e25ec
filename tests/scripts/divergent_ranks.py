"""Under torchrun: each rank claims a different plan digest; every rank must raise RankDivergenceError."""

from dist_cl.runtime.distributed import (
    RankDivergenceError,
    check_same_on_all_ranks,
    close_distributed,
    exit_process,
    init_distributed,
)

info = init_distributed(30)
check_same_on_all_ranks("config", "ab" * 32)
try:
    check_same_on_all_ranks("batch plan", f"{info.rank + 1}" * 64)
except RankDivergenceError as err:
    print(f"rank {info.rank} raised: {err}", flush=True)
    close_distributed()
    exit_process(0)
close_distributed()
exit_process(1)
