"""Training samplers: P x K identity batches, shuffled batches, per-epoch determinism, DDP split."""

from __future__ import annotations

from collections import Counter

from reid_deploy.data.samplers import IdentityBatchSampler, ShuffledBatchSampler

PIDS = [pid for pid in range(10) for _ in range(6)] + [10, 10, 11]  # ids 10 and 11 have < K images


def test_identity_batches_hold_p_identities_with_k_images_each():
    sampler = IdentityBatchSampler(PIDS, batch_size=16, num_instances=4, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        assert len(batch) == 16
        counts = Counter(PIDS[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {4}


def test_small_identities_are_sampled_with_replacement():
    sampler = IdentityBatchSampler(PIDS, batch_size=8, num_instances=4, seed=0)
    seen = Counter()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            for pid in {PIDS[i] for i in batch} & {10, 11}:
                members = [i for i in batch if PIDS[i] == pid]
                assert len(members) == 4 and all(PIDS[i] == pid for i in members)
                seen[pid] += 1
    assert seen[10] and seen[11]


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = IdentityBatchSampler(PIDS, 16, 4, seed=1)
    b = IdentityBatchSampler(PIDS, 16, 4, seed=1)
    b.set_epoch(1)
    b.set_epoch(0)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)


def test_ranks_get_disjoint_equal_shares_of_the_batches():
    whole = list(IdentityBatchSampler(PIDS, 8, 4, seed=2))
    ranks = [list(IdentityBatchSampler(PIDS, 8, 4, seed=2, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole) // 2
    assert ranks[0] == whole[0:len(whole) // 2 * 2:2] and ranks[1] == whole[1:len(whole) // 2 * 2:2]


def test_shuffled_batches_cover_each_image_once():
    batches = list(ShuffledBatchSampler(50, 8, seed=0))
    flat = [i for b in batches for i in b]
    assert all(len(b) == 8 for b in batches) and len(flat) == 48 == len(set(flat))
