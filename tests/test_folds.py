"""Subject-wise K-fold split (nerveseg_jax.data.folds)."""

import subprocess
import sys

import numpy as np
import pytest

from nerveseg_jax.data import folds

SUBJECTS = np.repeat(np.arange(1, 48), 120)  # the Kaggle set: 47 subjects, ~120 frames


@pytest.mark.parametrize("k", [2, 5, 10])
def test_folds_disjoint_cover_and_balanced(k):
  seen = []
  for f in range(k):
    train, val = folds.split_subjects(SUBJECTS, k, f)
    assert not set(train) & set(val)
    assert set(train) | set(val) == set(range(1, 48))
    seen.append(val)
  sizes = [len(v) for v in seen]
  assert max(sizes) - min(sizes) <= 1
  # Every subject is validation in exactly one fold.
  assert sorted(np.concatenate(seen)) == list(range(1, 48))


def test_assignment_depends_only_on_the_set_of_subjects():
  ref = folds.split_subjects(SUBJECTS, 5, 2)
  shuffled = np.random.default_rng(0).permutation(SUBJECTS)
  for other in (shuffled, list(reversed(SUBJECTS.tolist())), np.unique(SUBJECTS)):
    got = folds.split_subjects(other, 5, 2)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])
  # Not simply contiguous blocks of subject ids.
  assert ref[1].tolist() != list(range(ref[1][0], ref[1][0] + len(ref[1])))


def test_same_split_in_fresh_processes_with_other_hash_seeds():
  code = ("from nerveseg_jax.data import folds;"
          "print(folds.split_subjects(range(1, 48), 5, 1)[1].tolist())")
  outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": seed}).stdout
          for seed in ("1", "2")}
  assert outs == {str(folds.split_subjects(SUBJECTS, 5, 1)[1].tolist()) + "\n"}


def test_fold_minus_one_trains_on_everything():
  train, val = folds.split_subjects(SUBJECTS, 5, -1)
  assert set(train) == set(range(1, 48)) and val.size == 0
  mask = folds.select(SUBJECTS, 5, -1, "train")
  assert mask.all()


def test_select_uses_the_global_subject_set():
  # A host holding only some subjects must get the same folds as one holding all.
  part = SUBJECTS[SUBJECTS % 3 == 0]
  got = folds.select(part, 5, 0, "val", all_subjects=np.unique(SUBJECTS))
  _, val = folds.split_subjects(SUBJECTS, 5, 0)
  np.testing.assert_array_equal(got, np.isin(part, val))


@pytest.mark.parametrize("k, f, key", [(5, 5, "data.fold"), (5, -2, "data.fold"),
                                       (0, 0, "data.num_folds"), (1, 0, "data.num_folds"),
                                       ("x", 0, "data.num_folds")])
def test_bad_keys_are_named(k, f, key):
  with pytest.raises(ValueError, match=key):
    folds.split_subjects(SUBJECTS, k, f)


def test_empty_fold_is_an_error_naming_the_keys():
  # 3 subjects over 5 folds: folds 3 and 4 are empty.
  assert folds.split_subjects([1, 2, 3], 5, 0)[1].size == 1
  with pytest.raises(ValueError, match="data.fold=4 holds no subject"):
    folds.split_subjects([1, 2, 3], 5, 4)
