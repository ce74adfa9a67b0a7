import pytest
import torch

from megdet.data.sampler import GlobalShuffleSampler, epoch_permutation, image_seed


def _global_batches(num_images, batch, world, max_iter, seed=0, start_iter=0, groups=None):
    shares = [
        list(
            GlobalShuffleSampler(
                num_images, batch, r, world, seed, max_iter, start_iter, group_ids=groups
            )
        )
        for r in range(world)
    ]
    return [sum((share[i] for share in shares), []) for i in range(len(shares[0]))]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_global_batches_do_not_depend_on_world_size(world):
    single = _global_batches(21, 8, 1, 9)
    assert _global_batches(21, 8, world, 9) == single


def test_each_epoch_is_one_permutation_padded_from_its_start():
    sampler = GlobalShuffleSampler(21, 8, 0, 1, seed=5, max_iter=6)
    assert sampler.iters_per_epoch == 3
    batches = list(sampler)
    for epoch in range(2):
        pairs = sum(batches[3 * epoch : 3 * epoch + 3], [])
        assert {e for e, _ in pairs} == {epoch}
        indices = [i for _, i in pairs]
        perm = epoch_permutation(21, 5, epoch).tolist()
        assert indices == perm + perm[:3]  # 24 slots: the permutation, then its first 3
    first = [i for _, i in sum(batches[:3], [])][:21]
    second = [i for _, i in sum(batches[3:], [])][:21]
    assert sorted(first) == sorted(second) == list(range(21)) and first != second


def test_resume_at_any_iteration_continues_the_same_order():
    full = _global_batches(50, 8, 2, 20)
    assert _global_batches(50, 8, 2, 20, start_iter=13) == full[13:]
    sampler = GlobalShuffleSampler(50, 8, 0, 2, 0, 20)
    assert [[i for _, i in b] for b in full[13:14]] == [sampler.global_batch_at(13)[1]]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_aspect_ratio_grouping_is_global_and_world_size_invariant(world):
    # 45 images, every third one portrait: 15 portrait, 30 landscape; batch 8 -> 6 iterations.
    groups = [int(i % 3 == 0) for i in range(45)]
    batches = _global_batches(45, 8, world, 12, groups=groups)
    assert batches == _global_batches(45, 8, 1, 12, groups=groups)
    for epoch in range(2):
        epoch_batches = [[i for _, i in b] for b in batches[6 * epoch : 6 * epoch + 6]]
        # 30 landscape -> 3 full batches, 15 portrait -> 1; the 14 left over fill 2 batches.
        single_group = [b for b in epoch_batches if len({groups[i] for i in b}) == 1]
        assert len(single_group) >= 4
        assert sorted(set(sum(epoch_batches, []))) == list(range(45))  # each image, every epoch
        # Full buckets come in the order the permutation fills them.
        perm = epoch_permutation(45, 0, epoch).tolist()
        first = epoch_batches[0]
        assert first == [i for i in perm if groups[i] == groups[first[0]]][:8]
    with pytest.raises(ValueError, match="3 group ids for 45 images"):
        GlobalShuffleSampler(45, 8, 0, 1, 0, 1, group_ids=[0, 1, 0])


def test_batch_larger_than_dataset_and_bad_split():
    batches = _global_batches(3, 8, 2, 2)
    assert all(len(b) == 8 for b in batches)
    with pytest.raises(ValueError, match="not divisible"):
        GlobalShuffleSampler(10, 8, 0, 3, 0, 1)


def test_image_seed_is_stable_and_distinct():
    assert image_seed(0, 1, 2) == image_seed(0, 1, 2)
    seeds = {image_seed(s, e, i) for s in range(3) for e in range(3) for i in range(50)}
    assert len(seeds) == 450
    assert all(0 <= s < 2**63 for s in seeds)
    # Known values: a changed seeding scheme would silently change every run's data order
    # (and make old checkpoints resume on different images).
    assert image_seed(0, 0, 0) == 4324601099084218337
    assert epoch_permutation(10, 0, 0).tolist() == [7, 0, 9, 2, 1, 3, 8, 4, 6, 5]
    assert not torch.equal(epoch_permutation(100, 1, 0), epoch_permutation(100, 1, 1))
