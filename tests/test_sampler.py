import numpy as np
import pytest

from dist_cl.plan.sampler import BatchPlan, PlanSampler
from dist_cl.selection import select_batches


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_rank_slices_reassemble_the_global_batches(world_size):
    n, b = 100, 16
    batches = select_batches("random", None, None, b, seed=3, num_samples=n)
    plan = BatchPlan(batches, epoch=0, strategy="random")
    per_rank = [list(PlanSampler(plan, r, world_size)) for r in range(world_size)]
    for step in range(len(plan)):
        rebuilt = np.concatenate([per_rank[r][step] for r in range(world_size)])
        np.testing.assert_array_equal(rebuilt, batches[step])


def test_sampler_resumes_at_its_cursor():
    plan = BatchPlan(np.arange(24).reshape(6, 4), epoch=2, strategy="fixed")
    sampler = PlanSampler(plan, rank=1, world_size=2)
    it = iter(sampler)
    next(it), next(it)
    sampler.advance(), sampler.advance()
    state = sampler.state_dict()
    restored = PlanSampler(BatchPlan(np.zeros((1, 4), dtype=np.int64), 0, "x"), rank=1, world_size=2)
    restored.load_state_dict(state)
    assert list(restored) == [[10, 11], [14, 15], [18, 19], [22, 23]]
    assert len(restored) == 4 and restored.plan.digest() == plan.digest()


def test_global_batch_must_split_evenly_over_ranks():
    plan = BatchPlan(np.arange(12).reshape(2, 6), epoch=0, strategy="random")
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by world_size=4"):
        PlanSampler(plan, 0, 4)
