"""Contradictory near-duplicates (nerveseg_jax.data.duplicates) on planted pairs."""

import csv

import numpy as np
from PIL import Image
import pytest

from nerveseg_jax.data import arrays, duplicates, preprocess, synthetic


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
  """A small synthetic tree (with its planted pairs) read and resized as the pipeline does."""
  tree = synthetic.write_tree(tmp_path_factory.mktemp("dup") / "tree", subjects=4,
                              frames=10, test_subjects=0, seed=3)
  with open(tree / "train_masks.csv", newline="") as f:
    ids = [f"{r['subject']}_{r['img']}" for r in csv.DictReader(f)]
  with open(tree / "planted_duplicates.csv", newline="") as f:
    planted = [(r["empty_id"], r["nerve_id"]) for r in csv.DictReader(f)]
  read = lambda p: np.asarray(Image.open(p))[..., None]
  img = np.stack([read(tree / "train" / f"{i}.tif") for i in ids])
  msk = np.stack([read(tree / "train" / f"{i}_mask.tif") > 0 for i in ids])
  img = np.asarray(np.clip(np.round(preprocess.resize(img, (64, 96))), 0, 255), np.uint8)
  msk = np.asarray(preprocess.resize(msk, (64, 96), is_mask=True), np.uint8)
  subj = np.array([int(i.split("_")[0]) for i in ids], np.int32)
  assert planted, "the generator always plants a pair in subject 1"
  return arrays.Arrays(image=img, mask=msk, has_nerve=msk.reshape(len(msk), -1).any(1),
                       labeled=np.ones(len(ids), bool), id=np.array(ids), subject=subj), planted


def test_planted_pairs_found_and_nothing_else(frames):
  a, planted = frames
  pairs = duplicates.find_contradictory_pairs(a.image, a.mask, a.subject)
  assert sorted((a.id[e], a.id[n]) for e, n in pairs) == sorted(planted)


def test_consistent_or_cross_subject_copies_are_not_flagged(frames):
  a, planted = frames
  img, msk, subj = a.image.copy(), a.mask.copy(), a.subject.copy()
  rng = np.random.default_rng(0)
  planted_rows = {i for p in planted for i in np.flatnonzero(np.isin(a.id, p))}
  nerve = [i for i in np.flatnonzero(a.has_nerve) if i not in planted_rows]
  empty = [i for i in np.flatnonzero(~a.has_nerve) if i not in planted_rows]
  # A near-copy whose mask agrees (both with a nerve) is not contradictory ...
  s = next(s for s in np.unique(subj) if np.sum(subj[nerve] == s) >= 2)
  src, dst = [i for i in nerve if subj[i] == s][:2]
  img[dst] = np.clip(img[src] + rng.normal(0, 1.5, img[src].shape), 0, 255)
  msk[dst] = msk[src]
  # ... nor is a copy of a nerve frame into an empty frame of another subject.
  other = next(i for i in empty if subj[i] != subj[src])
  img[other] = img[src]
  pairs = duplicates.find_contradictory_pairs(img, msk, subj)
  assert sorted((a.id[e], a.id[n]) for e, n in pairs) == sorted(planted)


def test_apply_modes(frames):
  a, planted = frames
  assert len(duplicates.find_contradictory_pairs(a.image, a.mask, a.subject)) == len(planted)
  assert arrays.apply_duplicates(a, "keep", None) is a
  dropped = arrays.apply_duplicates(a, "drop", None)
  assert len(dropped.image) == len(a.image) - len(planted)
  assert not set(dropped.id) & {e for e, _ in planted}
  assert {n for _, n in planted} <= set(dropped.id)
  prop = arrays.apply_duplicates(a, "propagate", None)
  for e, n in planted:
    ie, i_n = int(np.flatnonzero(a.id == e)[0]), int(np.flatnonzero(a.id == n)[0])
    np.testing.assert_array_equal(prop.mask[ie], a.mask[i_n])
    assert prop.has_nerve[ie] and not a.has_nerve[ie]  # the input is left alone
  assert len(prop.image) == len(a.image)


def test_pairs_cached_by_content(frames, tmp_path, monkeypatch):
  a, planted = frames
  first = duplicates.find_contradictory_pairs(a.image, a.mask, a.subject, cache_dir=tmp_path)
  assert len(list(tmp_path.glob("duplicates_*.npz"))) == 1

  def fail(*args, **kwargs):
    raise AssertionError("recomputed despite the cache")

  monkeypatch.setattr(duplicates, "signatures", fail)
  again = duplicates.find_contradictory_pairs(a.image, a.mask, a.subject, cache_dir=tmp_path)
  np.testing.assert_array_equal(first, again)
  changed = a.mask.copy()
  changed[0] = 1 - changed[0]
  with pytest.raises(AssertionError, match="recomputed"):  # other content: other key
    duplicates.find_contradictory_pairs(a.image, changed, a.subject, cache_dir=tmp_path)


def test_bad_mode_is_named():
  with pytest.raises(ValueError, match="data.duplicates='fix'"):
    duplicates.check_mode("fix")
