"""Edit forensics on tiny models: planted and ROME edits found, read and reversed from weights.

Every test runs on the three tiny models of the ``model`` fixture (GPT-2 and Gemma layouts as
HookedTransformers, and a Gemma 3 TransformerBridge), so both model APIs are covered.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _support import STATS_CORPUS, cached_edit, model_kind
from tiny import tiny_model

import rome_lens
from rome_lens import Edit, EditRequest, LowRankSite, base_fingerprint, base_weights
from rome_lens.audit import ScanConfig, ScanReport, scan
from rome_lens.audit.forensics.decode import subject_keys_at
from rome_lens.audit.forensics.spectrum import key_directions, matched_subject_scores
from rome_lens.cli import main
from rome_lens.errors import InvalidRequestError
from rome_lens.models import access
from rome_lens.predict import next_token_logprobs, next_token_logprobs_batch
from rome_lens.statistics import context_templates

REQUEST = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
OTHERS = ["Bob Jones", "Carol King", "Dave Brown", "Eve Adams"]
PROBES = ["Bob Jones lives in", "The quick brown fox", "Pack my box with", "Alice Smith"]


def _fresh(model):
    """An unedited copy of a conftest tiny model (same seed, same weights)."""
    return tiny_model(model_kind(model))


def _value_direction(model, layer: int, token: str) -> torch.Tensor:
    """A raw MLP output direction of ``layer`` that the logit lens reads as ``token`` (Adam on
    its log-probability through the post-MLP norm, the final norm and the unembedding)."""
    target = int(model.to_tokens(token, prepend_bos=False)[0, 0])
    gen = torch.Generator().manual_seed(1)
    r = (0.1 * torch.randn(int(model.cfg.d_model), generator=gen)).requires_grad_(True)
    optimiser = torch.optim.Adam([r], lr=0.1)
    norm = access.post_mlp(model, layer)
    for _ in range(60):
        x = norm(r[None, None])[0, 0] if norm is not None else r
        loss = -access.decode_residual(model, x[None])[0].log_softmax(-1)[target]
        (grad,) = torch.autograd.grad(loss, r)
        r.grad = grad
        optimiser.step()
    return r.detach() / r.detach().norm()


def _planted(model, layer: int, rank: int, scale: float, seed: int,
             right: torch.Tensor | None = None) -> Edit:
    """A rank-``rank`` change of ``W_out`` of ``layer`` of norm ``scale`` x the weight's."""
    with base_weights(model):
        weight = access.read_mlp_out(model, layer)
    gen = torch.Generator().manual_seed(seed)
    left = torch.randn(weight.shape[0], rank, generator=gen)
    if right is None:
        right = torch.randn(rank, weight.shape[1], generator=gen)
    right = right.reshape(rank, -1)
    left *= scale * float(weight.norm()) / float((left @ right).norm())
    return Edit(sites=(LowRankSite(layer, left, right),), requests=(), method="planted",
                hparams={"seed": seed}, base_fingerprint=base_fingerprint(model))


def _state_dict(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_planted_rank_one_and_rank_k_edits_are_found_exactly_with_the_base(model) -> None:
    one = _planted(model, 1, 1, 0.05, seed=0).apply(model)
    three = _planted(model, 2, 3, 0.05, seed=1).apply(model)
    bases = [None, _fresh(model), _state_dict(_fresh(model))]
    for base, mode in zip(bases, ["base:registry", "base:model", "base:state_dict"], strict=True):
        report = scan(model, base)
        assert report.mode == mode
        assert [(f.layer, f.weight, f.rank, f.confidence) for f in report.findings] == [
            (1, "blocks.1.mlp.W_out", 1, 1.0), (2, "blocks.2.mlp.W_out", 3, 1.0)]
        for finding, edit in zip(report.findings, (one, three), strict=True):
            expected = torch.linalg.svdvals(edit.sites[0].delta().double())[: finding.rank]
            assert torch.allclose(torch.tensor(finding.singular_values).double(), expected,
                                  rtol=1e-4)
            assert finding.relative_norm == pytest.approx(0.05, rel=1e-3)
            assert finding.reversal is not None and finding.reversal.sites[0].rank == finding.rank
    # small planted edits hide in the spectrum: nothing is inferred without the base
    assert scan(model, use_registry=False).findings == ()


def test_the_new_object_is_decoded_with_and_without_the_base(model) -> None:
    direction = _value_direction(model, 1, "Z")
    _planted(model, 1, 1, 1.0, seed=2, right=direction).apply(model)
    with_base = scan(model)
    blind = scan(model, use_registry=False)
    for report in (with_base, blind):
        (finding,) = report.findings
        assert (finding.layer, finding.rank) == (1, 1)
        assert finding.objects[0] == "Z"
        assert finding.components[0].objects[0] == "Z"
    assert blind.findings[0].score > 2 * blind.threshold
    assert 0.5 < blind.findings[0].confidence < 1.0
    assert blind.layer_scores.argmax() == 1


def test_the_subject_is_named_from_a_candidate_list(model, hparams) -> None:
    cached_edit(model, REQUEST, 1, hparams).apply(model)
    templates = context_templates(model, hparams)
    report = scan(model, candidates=[*OTHERS[:2], "Alice Smith", *OTHERS[2:]],
                  templates=templates)
    (finding,) = report.findings
    assert (finding.layer, finding.rank, finding.subject) == (1, 1, "Alice Smith")
    assert finding.subjects[0][1] > 2.5 * finding.subjects[1][1]
    assert len(finding.objects) == 10
    # without the edited subject among the candidates, no subject is named
    assert scan(model, candidates=OTHERS, templates=templates).findings[0].subject is None
    # ROME's k* is the candidate key at the same templates: the edit fires on it by ||right||
    scaled = finding.components[0].left * finding.singular_values[0]
    edit = rome_lens.applied_edits(model)[0]
    fired = abs(float(edit.k_star.reshape(-1).float() @ scaled))
    assert fired == pytest.approx(float(edit.right.norm()), rel=1e-3)


def test_the_new_object_is_read_from_questions_about_the_named_subject(model, hparams) -> None:
    """With the subject named, the object is what the change makes likelier after it."""
    edit = cached_edit(model, REQUEST, 1, hparams).apply(model)
    templates = context_templates(model, hparams)
    queries = ("{} lives in", "The home of {} is")
    candidates = [*OTHERS, "Alice Smith"]
    (finding,) = scan(model, candidates=candidates, templates=templates,
                      config=ScanConfig(queries=queries)).findings
    assert finding.subject == "Alice Smith"
    prompts = [q.format("Alice Smith") for q in queries]
    edited = next_token_logprobs_batch(model, prompts)
    with base_weights(model):
        unedited = next_token_logprobs_batch(model, prompts)
    gain = (edited.exp() - unedited.exp()).sum(0)
    expected = [model.tokenizer.decode([int(t)]).strip() for t in gain.topk(3).indices]
    assert [o.strip() for o in finding.objects[:3]] == expected
    assert float(gain.max()) > 1e-3  # the edit moves these questions' answers
    # queries=() decodes the value direction through the lens instead (another reading)
    lens_read = scan(model, candidates=candidates, templates=templates,
                     config=ScanConfig(queries=())).findings[0]
    assert lens_read.subject == "Alice Smith" and len(lens_read.objects) == 10
    edit.revert(model)


def test_batched_next_token_logprobs_equal_one_prompt_at_a_time(model) -> None:
    prompts = ["Alice Smith lives in", "The", "Bob Jones works for the city of"]
    batched = next_token_logprobs_batch(model, prompts, batch_size=2)
    single = torch.stack([next_token_logprobs(model, p).float() for p in prompts])
    assert batched.shape == single.shape
    assert float((batched - single).abs().max()) < 1e-4


def test_nothing_is_flagged_on_an_unedited_model(model) -> None:
    report = scan(model, candidates=["Alice Smith"], probes=PROBES)
    assert report.mode == "spectrum" and report.findings == () and report.reversal is None
    assert float(report.layer_scores.abs().max()) < report.threshold / 2
    assert scan(model, _fresh(model)).findings == ()
    assert scan(model, _state_dict(model)).findings == ()
    for seed in (1, 2):  # deeper models, other seeds
        deeper = tiny_model(model_kind(model), seed=seed, n_layers=6)
        assert float(scan(deeper).layer_scores.max()) < scan(deeper).threshold / 2


def test_the_blind_reversal_restores_a_planted_edit(model) -> None:
    base = _fresh(model)
    edit = _planted(model, 1, 1, 3.0, seed=3, right=_value_direction(model, 1, "Z")).apply(model)
    before = access.parameters_checksum(model)
    report = scan(model, use_registry=False, probes=PROBES)
    assert access.parameters_checksum(model) == before  # scanning never changes the weights
    assert any(r.edited != r.base for r in report.recovery)  # the edit changed predictions
    assert all(r.restored for r in report.recovery)
    assert min(r.fraction for r in report.recovery if r.fraction is not None) > 0.8
    assert report.reversal is not None
    with report.reversal.applied(model):
        for prompt in PROBES:
            assert rome_lens.top_tokens(model, prompt, 1)[0][0] == \
                rome_lens.top_tokens(base, prompt, 1)[0][0]
    edit.revert(model)
    assert access.parameters_checksum(model) == access.parameters_checksum(base)


def _in_key_subspace(model, layer: int, basis: torch.Tensor, scale: float) -> Edit:
    """A rank-one change whose key side lies in ``basis`` (columns: eigenvectors of C), of norm
    ``scale`` x the weight's, writing a direction the logit lens reads as "Z"."""
    weight = access.read_mlp_out(model, layer)
    left = basis @ torch.randn(basis.shape[1], 1, generator=torch.Generator().manual_seed(3))
    right = _value_direction(model, layer, "Z")[None]
    left *= scale * float(weight.norm()) / float((left @ right).norm())
    return Edit(sites=(LowRankSite(layer, left, right),), requests=(), method="planted",
                hparams={"scale": scale}, base_fingerprint=base_fingerprint(model))


def test_the_key_subspace_score_singles_out_changes_in_rarely_used_key_directions(
    model, hparams
) -> None:
    deeper = tiny_model(model_kind(model), seed=1, n_layers=6)
    options = {"corpus": STATS_CORPUS, "hparams": hparams, "use_registry": False}
    unedited = scan(deeper, **options)
    assert unedited.key_scores is not None and unedited.findings == ()
    assert float(unedited.key_scores.max()) < unedited.key_threshold
    moment = rome_lens.second_moment(deeper, 3, corpus=STATS_CORPUS, hparams=hparams)
    vectors = torch.linalg.eigh(moment.double())[1].float()
    m = vectors.shape[0] // 8  # ScanConfig.key_subspace = 1/8
    score = {}
    for name, basis in (("rare", vectors[:, :m]), ("common", vectors[:, -m:])):
        with _in_key_subspace(deeper, 3, basis, 0.5).applied(deeper):
            keys = scan(deeper, **options).key_scores
        assert keys is not None
        score[name] = float(keys[3])
        if name == "rare":
            assert int(keys.argmax()) == 3
    # the same norm in the directions text excites most does not stand out there
    assert score["rare"] >= 3.0 and score["rare"] > score["common"] + 2.0, score


def test_a_key_subspace_finding_is_read_and_reversed(model, hparams) -> None:
    deeper = tiny_model(model_kind(model), seed=1, n_layers=6)
    base = tiny_model(model_kind(model), seed=1, n_layers=6)
    moment = rome_lens.second_moment(deeper, 3, corpus=STATS_CORPUS, hparams=hparams)
    basis = torch.linalg.eigh(moment.double())[1].float()[:, :8]
    edit = _in_key_subspace(deeper, 3, basis, 0.5).apply(deeper)
    config = ScanConfig(z_threshold=float("inf"), key_threshold=3.0)  # the key score alone
    report = scan(deeper, use_registry=False, probes=PROBES, corpus=STATS_CORPUS,
                  hparams=hparams, config=config)
    (finding,) = report.findings
    assert (finding.layer, finding.mode, finding.rank, finding.objects[0]) == (3, "keys", 1, "Z")
    assert finding.score == pytest.approx(float(report.key_scores[3]))
    assert 0.5 <= finding.confidence < 1.0
    assert report.reversal is not None
    with report.reversal.applied(deeper):
        for prompt in PROBES:
            assert rome_lens.top_tokens(deeper, prompt, 1)[0][0] == \
                rome_lens.top_tokens(base, prompt, 1)[0][0]
    assert report.summary()["key_scores"] == [round(float(s), 3) for s in report.key_scores]
    edit.revert(deeper)
    assert access.parameters_checksum(deeper) == access.parameters_checksum(base)


def test_a_rome_edit_is_found_and_reversed_with_the_base(model, hparams) -> None:
    edit = cached_edit(model, REQUEST, 1, hparams).apply(model)
    report = scan(model, probes=[REQUEST.text, *PROBES[:2]])
    (finding,) = report.findings
    assert (finding.layer, finding.rank) == (1, 1)
    assert finding.relative_norm == pytest.approx(
        float(edit.delta().norm() / access.read_mlp_out(_fresh(model), 1).norm()), rel=1e-3)
    assert all(r.restored and r.fraction > 0.99 for r in report.recovery
               if r.fraction is not None)
    # Without the base: on random 3-layer models a default tiny ROME edit (8 value steps, 8-24%
    # of ||W||) does not stand out of the spectrum; nothing is claimed then.
    blind = scan(model, use_registry=False)
    assert all(f.layer == 1 for f in blind.findings)


def test_report_values_repr_dataframe_plot_and_summary(model, tmp_path: Path) -> None:
    _planted(model, 1, 1, 1.0, seed=2, right=_value_direction(model, 1, "Z")).apply(model)
    report = scan(model, candidates=["Alice Smith", "Bob Jones"], probes=PROBES[:2])
    assert isinstance(report, ScanReport)
    for text in (repr(report), repr(report.findings[0]), repr(report.findings[0].components[0])):
        assert "tensor" not in text and len(text.splitlines()) == 1 and len(text) <= 300
    assert "blocks.1.mlp.W_out rank 1 -> 'Z'" in repr(report)
    frame = report.to_dataframe()
    assert frame.loc[0, "layer"] == 1 and frame.loc[0, "objects"][0] == "Z"
    report.plot(str(tmp_path / "scan.png"))
    assert (tmp_path / "scan.png").stat().st_size > 1000
    json.dumps(report.summary())
    assert report.layers == (1,)


def test_bad_bases_and_candidates_are_refused(model) -> None:
    with pytest.raises(InvalidRequestError, match="no"):
        scan(model, {"nothing": torch.zeros(1)})
    with pytest.raises(InvalidRequestError, match="candidates"):
        scan(model, candidates="Alice Smith")
    with pytest.raises(InvalidRequestError, match="layers"):
        scan(model, tiny_model(model_kind(model), n_layers=2))


def test_cli_scan_reads_edit_files_and_prints_json(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    edit = _planted(model, 1, 1, 1.0, seed=2, right=_value_direction(model, 1, "Z"))
    path = edit.save(tmp_path / "planted.safetensors")
    (tmp_path / "subjects.txt").write_text("Alice Smith\nBob Jones\n")
    monkeypatch.setattr(rome_lens, "load_model", lambda name=None: model)
    args = ["scan", "--edit", str(path), "--candidates", str(tmp_path / "subjects.txt"),
            "--out", str(tmp_path / "scan.png"), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["mode"] == "base:registry"
    assert [(f["layer"], f["rank"]) for f in summary["findings"]] == [(1, 1)]
    assert (tmp_path / "scan.png").exists()
    rome_lens.revert_all(model)
    assert main(["scan", "--edit", str(path), "--blind", "--probe", PROBES[0]]) == 0
    out = capsys.readouterr().out
    assert "spectrum: 1 finding" in out and "blocks.1.mlp.W_out" in out


def test_candidate_keys_are_cached_per_layer_and_the_weights_below_it(
    model, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rome_lens.audit.forensics import decode

    subjects = ["Alice Smith", *OTHERS]
    templates = ["{}", "Once upon a time. {}", "Hello there, {}"]
    plain = decode.subject_keys_at(model, [1, 2], subjects, templates)
    monkeypatch.setattr(decode, "KEY_CHUNK_ROWS", 4)  # one subject per chunk: same keys
    cached = decode.subject_keys_at(model, [1, 2], subjects, templates, cache=True)
    for layer in (1, 2):
        assert cached[layer].shape == (len(subjects), access.read_mlp_out(model, layer).shape[0])
        assert torch.allclose(cached[layer], plain[layer], atol=1e-5, rtol=1e-4)
    passes: list[list[int]] = []
    original = decode.keys_at_positions

    def counting(m, layers, rows, positions):
        passes.append(list(layers))
        return original(m, layers, rows, positions)

    monkeypatch.setattr(decode, "keys_at_positions", counting)
    again = decode.subject_keys_at(model, [2, 1], subjects, templates, cache=True)
    assert passes == [] and all(torch.equal(again[i], cached[i]) for i in (1, 2))
    # an edit at layer 1 cannot change keys at layer 1; it changes those at layer 2
    _planted(model, 1, 1, 1.0, seed=4).apply(model)
    edited = decode.subject_keys_at(model, [1, 2], subjects, templates, cache=True)
    assert torch.equal(edited[1], cached[1])
    assert passes and all(p == [2] for p in passes)
    assert not torch.allclose(edited[2], cached[2])
    passes.clear()
    with base_weights(model):  # the base model's keys, from the cache
        assert torch.equal(decode.subject_keys_at(model, [2], subjects, templates,
                                                  cache=True)[2], cached[2])
    assert passes == []
    other = decode.key_cache_path(model, 1, subjects[:2], templates)
    assert other != decode.key_cache_path(model, 1, subjects, templates)


def test_a_scan_reads_candidate_keys_from_the_cache(model, hparams) -> None:
    from rome_lens.audit import ScanConfig

    cached_edit(model, REQUEST, 1, hparams).apply(model)
    templates = context_templates(model, hparams)
    candidates = [*OTHERS, "Alice Smith"]
    fresh = scan(model, candidates=candidates, templates=templates,
                 config=ScanConfig(cache_keys=False))
    first = scan(model, candidates=candidates, templates=templates)
    second = scan(model, candidates=candidates, templates=templates)
    for report in (first, second):
        (finding,) = report.findings
        assert finding.subject == "Alice Smith"
        assert [s for s, _ in finding.subjects] == [s for s, _ in fresh.findings[0].subjects]
    scores = [[v for _, v in r.findings[0].subjects] for r in (fresh, first, second)]
    assert scores[1] == pytest.approx(scores[0], rel=1e-4)
    assert scores[2] == pytest.approx(scores[1], rel=1e-5)



#: 26 candidates whose last characters (where the char-level tiny models read keys) differ.
NAMES = [f"Dr {name}" for name in (
    "Alba", "Bob", "Circ", "David", "Rose", "Leif", "Carol King", "Smith", "Levi", "Raj", "Nick",
    "Paul", "Kim", "Quinn", "Milo", "Philip", "Iraq", "Oscar", "Chris", "Matt", "Lulu", "Ravi",
    "Andrew", "Max", "Ray", "Fritz")]


def _rome_shaped(model, layer: int, subject: str, templates, hparams, scale: float) -> Edit:
    """``u r^T`` with ROME's key side ``u ~ C^-1 k`` of ``subject`` and a value read as "Z"."""
    moment = rome_lens.second_moment(model, layer, corpus=STATS_CORPUS, hparams=hparams)
    key = subject_keys_at(model, [layer], [subject], templates)[layer]
    left = key_directions(moment, key, float(rome_lens.default_hparams(model).mom2_ridge))[0]
    right = _value_direction(model, layer, "Z")
    weight = access.read_mlp_out(model, layer)
    left = left * scale * float(weight.norm())
    return Edit(sites=(LowRankSite(layer, left[:, None], right[None]),), requests=(),
                method="planted", hparams={}, base_fingerprint=base_fingerprint(model))


def test_matched_scores_name_the_subject_of_a_rome_shaped_edit_blind(model, hparams) -> None:
    # Tiny models' keys crowd a 64-dimensional space (the embedded model's z: edited subjects
    # 22-38 against 5.4 unedited, over 2048 dimensions), so the threshold here is lower.
    templates = context_templates(model, hparams)
    config = ScanConfig(z_threshold=float("inf"), key_subspace=0.0, match_threshold=3.5,
                        match_templates=0)
    kwargs = {"candidates": NAMES, "templates": templates, "corpus": STATS_CORPUS,
              "hparams": hparams, "config": config, "use_registry": False}
    assert scan(model, **kwargs).findings == ()
    base = _fresh(model)
    edit = _rome_shaped(model, 1, "Dr Carol King", templates, hparams, 0.3).apply(model)
    report = scan(model, probes=["Dr Carol King lives in", *PROBES[:2]], **kwargs)
    (finding,) = report.findings
    assert (finding.layer, finding.mode, finding.rank, finding.subject) == (
        1, "subject", 1, "Dr Carol King")
    assert finding.score >= config.match_threshold and 0.5 <= finding.confidence < 1.0
    assert [name for name, _ in finding.subjects] == ["Dr Carol King"]
    # the fitted update points along the planted one (its value side fitted in the 8
    # lowest-variance key directions, where the unedited weight is the fit's noise)
    fitted, planted = finding.reversal.delta().flatten(), edit.delta().flatten()
    assert float(-fitted @ planted / (fitted.norm() * planted.norm())) > 0.6
    # too few candidates: the matched score is not computed
    assert scan(model, **(kwargs | {"candidates": NAMES[:5]})).findings == ()
    edit.revert(model)
    assert access.parameters_checksum(model) == access.parameters_checksum(base)


def test_matched_scores_single_out_the_planted_direction() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 16, generator=gen)
    directions = torch.linalg.qr(torch.randn(48, 48, generator=gen))[0].T[:30]
    plain = matched_subject_scores(weight, directions, 0.1)
    edited = weight + 6.0 * torch.outer(directions[7], torch.randn(16, generator=gen))
    scores = matched_subject_scores(edited, directions, 0.1)
    assert float(plain.abs().max()) < 4.0
    assert int(scores.argmax()) == 7 and float(scores[7]) > 8.0
    assert float(torch.cat([scores[:7], scores[8:]]).max()) < 4.0
    moment = torch.diag(torch.linspace(0.1, 10.0, 48))
    keys = torch.randn(3, 48, generator=gen)
    u = key_directions(moment, keys, 0.0)
    assert torch.allclose(u.norm(dim=1), torch.ones(3))
    expected = keys / torch.linspace(0.1, 10.0, 48)
    assert torch.allclose(u, expected / expected.norm(dim=1, keepdim=True), atol=1e-6)
