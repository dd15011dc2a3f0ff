from __future__ import annotations

import pytest
import torch
from _support import STATS_CORPUS, one_thread

import rome_lens
from rome_lens.models import access
from rome_lens.statistics import StatisticsConfig


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with one_thread():
        yield


def _manual_second_moment(model, layer: int, texts: list[str], seq_len: int) -> torch.Tensor:
    ids: list[int] = []
    for text in texts:
        ids.extend(model.to_tokens(text, prepend_bos=False, truncate=False)[0].tolist())
    n = len(ids) // seq_len
    tokens = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    _, cache = model.run_with_cache(tokens, names_filter=access.key_hook_name(layer))
    keys = cache[access.key_hook_name(layer)].reshape(-1, model.cfg.d_mlp).double()
    return (keys.T @ keys / keys.shape[0]).float()


def test_second_moment_of_text_corpus(model, hparams) -> None:
    before = access.parameters_checksum(model)
    mom2 = rome_lens.second_moment(model, 1, corpus=STATS_CORPUS, hparams=hparams)
    assert mom2.shape == (model.cfg.d_mlp, model.cfg.d_mlp)
    assert mom2.dtype == torch.float32
    expected = _manual_second_moment(model, 1, STATS_CORPUS, hparams.stats_seq_len)
    torch.testing.assert_close(mom2, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(mom2, mom2.T)
    assert torch.linalg.eigvalsh(mom2.double()).min() > -1e-6
    # cached: a second call returns the identical matrix
    assert torch.equal(rome_lens.second_moment(model, 1, corpus=STATS_CORPUS, hparams=hparams),
                       mom2)
    assert access.parameters_checksum(model) == before


def test_second_moment_depends_on_layer(model, hparams) -> None:
    m1 = rome_lens.second_moment(model, 1, corpus=STATS_CORPUS, hparams=hparams)
    m2 = rome_lens.second_moment(model, 2, corpus=STATS_CORPUS, hparams=hparams)
    assert not torch.allclose(m1, m2)


def test_second_moment_of_one_long_text(model, hparams) -> None:
    """A corpus given as one string of 300-4095 characters is text, not a file path."""
    long_text = "".join(STATS_CORPUS)[:1000]
    assert 255 < len(long_text) < 4096
    mom2 = rome_lens.second_moment(model, 1, corpus=[long_text], hparams=hparams)
    expected = _manual_second_moment(model, 1, [long_text], hparams.stats_seq_len)
    torch.testing.assert_close(mom2, expected, atol=1e-5, rtol=1e-4)


def test_second_moment_reads_text_files(model, hparams, tmp_path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("".join(STATS_CORPUS))
    from_file = rome_lens.second_moment(model, 1, corpus=[path], hparams=hparams)
    expected = _manual_second_moment(model, 1, ["".join(STATS_CORPUS)], hparams.stats_seq_len)
    torch.testing.assert_close(from_file, expected, atol=1e-5, rtol=1e-4)


def test_second_moment_too_small_corpus(model, hparams) -> None:
    with pytest.raises(rome_lens.RomeLensError, match="need"):
        rome_lens.second_moment(model, 1, corpus=["tiny"], hparams=hparams)
    with pytest.raises(rome_lens.LayerOutOfRangeError):
        rome_lens.second_moment(model, 7, corpus=STATS_CORPUS, hparams=hparams)


# ---------------------------------------------------------------- default (model-sampled) corpus
def test_packaged_corpus_rows_are_used_without_sampling(model, tmp_path, monkeypatch) -> None:
    from rome_lens.statistics import corpus as corpus_mod

    sha = "ab" * 32
    shipped = torch.randint(0, model.cfg.d_vocab, (6, 16))
    path = corpus_mod.write_packaged_corpus(tmp_path, sha, shipped, seed=0, top_k=40, batch=2)
    assert path.name == f"{sha[:16]}.npz"
    monkeypatch.setattr(corpus_mod, "PACKAGED_DIR", tmp_path)
    monkeypatch.setattr(corpus_mod, "_sample_corpus", _no_sampling)
    monkeypatch.setattr(model, "_rome_lens_source_sha256", sha, raising=False)
    tokens, corpus_id = corpus_mod.corpus_tokens(model, None, StatisticsConfig(4, 16, 0))
    assert torch.equal(tokens, shipped[:4])
    assert corpus_id == f"packaged-{sha[:12]}-k40-s0-4x16"
    # C of the packaged corpus equals C of the same tokens given by hand
    mom2 = rome_lens.second_moment(model, 1, hparams=StatisticsConfig(4, 16, 0))
    _, cache = model.run_with_cache(shipped[:4], names_filter=access.key_hook_name(1))
    keys = cache[access.key_hook_name(1)].reshape(-1, model.cfg.d_mlp).double()
    torch.testing.assert_close(mom2, (keys.T @ keys / keys.shape[0]).float(),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [(7, 16, 0), (4, 8, 0), (4, 16, 1)])
def test_packaged_corpus_that_does_not_fit_is_not_used(model, tmp_path, monkeypatch, size):
    from rome_lens.statistics import corpus as corpus_mod

    sha = "cd" * 32
    corpus_mod.write_packaged_corpus(tmp_path, sha, torch.zeros(6, 16, dtype=torch.long),
                                     seed=0, top_k=40, batch=2)
    monkeypatch.setattr(corpus_mod, "PACKAGED_DIR", tmp_path)
    monkeypatch.setattr(model, "_rome_lens_source_sha256", sha, raising=False)
    assert corpus_mod.packaged_corpus(model, StatisticsConfig(*size)) is None
    monkeypatch.setattr(model, "_rome_lens_source_sha256", "ef" * 32, raising=False)
    assert corpus_mod.packaged_corpus(model, StatisticsConfig(4, 16, 0)) is None


def test_packaged_corpus_needs_a_full_sha(tmp_path) -> None:
    from rome_lens.statistics import corpus as corpus_mod

    with pytest.raises(rome_lens.RomeLensError, match="sha256"):
        corpus_mod.write_packaged_corpus(tmp_path, "abc", torch.zeros(2, 4, dtype=torch.long),
                                         seed=0, top_k=40, batch=2)


def test_smaller_sampled_corpus_is_cut_from_a_larger_cached_one(model, monkeypatch) -> None:
    from rome_lens.statistics import corpus as corpus_mod

    monkeypatch.setattr(model, "_rome_lens_source_sha256", None, raising=False)
    large, large_id = corpus_mod.corpus_tokens(model, None, StatisticsConfig(128, 4, 3))
    assert large.shape == (128, 4) and large_id.startswith("self-")
    monkeypatch.setattr(corpus_mod, "_sample_corpus", _no_sampling)
    small, small_id = corpus_mod.corpus_tokens(model, None, StatisticsConfig(64, 4, 3))
    assert torch.equal(small, large[:64]) and small_id.endswith("-64x4")


def test_cut_corpus_equals_a_fresh_sample_of_that_size(model, monkeypatch) -> None:
    from rome_lens.statistics import corpus as corpus_mod

    monkeypatch.setattr(model, "_rome_lens_source_sha256", None, raising=False)
    large, _ = corpus_mod.corpus_tokens(model, None, StatisticsConfig(128, 4, 5))
    fresh = corpus_mod._sample_corpus(model, 64, 4, 5)
    assert torch.equal(large[:64], fresh)
    # a partial batch is not a prefix of a larger sample: sampled, not cut
    partial, _ = corpus_mod.corpus_tokens(model, None, StatisticsConfig(3, 4, 5))
    assert torch.equal(partial, corpus_mod._sample_corpus(model, 3, 4, 5))


def _no_sampling(*args, **kwargs):
    raise AssertionError("the corpus should not be sampled")
