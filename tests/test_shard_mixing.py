"""The train order of a shard set mixes classes as the README says (benchmarks/shard_mixing.py, small sizes): with the
converter's permutation and a shuffle buffer, batches hold as many classes as i.i.d. batches and rarely meet again
the next epoch; shards sorted by class without a buffer give batches of a few classes."""

from __future__ import annotations

from benchmarks.shard_mixing import (
    conversion_plan,
    iid_expectation,
    measure_order,
    read_epochs,
    synthetic_labels,
    write_files,
    write_shard_set,
)
from data.placement import Shard

CLASSES, PER_CLASS, SHARD_SAMPLES, BATCH, EPOCHS = 50, 40, 128, 64, 2


def test_permuted_shards_with_a_buffer_mix_like_iid_batches_and_sorted_shards_do_not(tmp_path):
    labels = synthetic_labels(CLASSES, PER_CLASS)
    files = write_files(tmp_path / "files", labels)
    permuted, by_class = (
        write_shard_set(
            tmp_path / name, tmp_path / "files", conversion_plan(tmp_path / "files", files, SHARD_SAMPLES, seed)
        ).train
        for name, seed in (("permuted", 0), ("sorted", None))
    )

    def measured(split, buffer: int) -> dict:
        epochs = read_epochs(split, Shard(0, 1), BATCH, EPOCHS, reader_seed=0, shuffle_buffer=buffer)
        return measure_order(epochs, BATCH, CLASSES, len(labels))

    iid = iid_expectation(CLASSES, PER_CLASS, BATCH, world_size=1)
    buffered, unbuffered, sorted_unbuffered = measured(permuted, 256), measured(permuted, 0), measured(by_class, 0)

    assert abs(buffered["distinct"] - iid["distinct"]) < 0.05 * iid["distinct"], (buffered, iid)
    assert abs(buffered["chi2"] - iid["chi2"]) < 0.15 * iid["chi2"], (buffered, iid)
    assert sorted_unbuffered["distinct"] < 0.2 * iid["distinct"], sorted_unbuffered
    assert sorted_unbuffered["chi2"] > 10 * iid["chi2"], sorted_unbuffered
    # Shards read in order make nearly the same batches every epoch; the buffer breaks them up.
    assert unbuffered["repeated_pairs"] > 0.3, unbuffered
    assert buffered["repeated_pairs"] < 2 * iid["repeated_pairs"], (buffered, iid)
