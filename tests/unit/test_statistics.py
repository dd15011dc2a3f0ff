from __future__ import annotations

import pytest
import torch
from _support import STATS_CORPUS, one_thread

import rome_lens
from rome_lens.models import access


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
