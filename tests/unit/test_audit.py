"""Audit: lenses, the structural check, verdicts on hand-built edits, erasure objectives."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from _support import STATS_CORPUS, cached_edit, key_stats, model_kind

import rome_lens
from rome_lens import EditRequest
from rome_lens._typing import Model as HookedTransformer
from rome_lens.audit import (
    ERASURE,
    INSERTION,
    TunedLens,
    TunedLensConfig,
    VerdictRule,
    logit_lens,
    probe_edit,
    train_tuned_lens,
)
from rome_lens.errors import EditStateError, InvalidRequestError
from rome_lens.models import access
from rome_lens.rome.values import finished

PROMPT = "Bob Jones lives in"
SUBJECT = "Bob Jones"


def _final_probs(model: HookedTransformer, text: str) -> torch.Tensor:
    return model(text)[0, -1].softmax(-1)


@dataclass
class HookEdit:
    """A hand-built edit: forward hooks applied only inside ``applied``."""

    layer: int
    request: EditRequest
    hooks: list[tuple[str, Any]]

    @contextmanager
    def applied(self, model: HookedTransformer) -> Iterator[HookedTransformer]:
        with model.hooks(fwd_hooks=self.hooks):
            yield model


def _objects(model: HookedTransformer) -> tuple[int, int]:
    """Old object: the top-5 token the subject supports most (clean vs subject-noised, as the
    probe's control); new object: a token ranked ~10th."""
    from rome_lens.tracing import embedding_std, subject_noise_hook

    probs = _final_probs(model, PROMPT)
    _, span = rome_lens.subject_token_span(model, PROMPT, SUBJECT)
    noise = subject_noise_hook(model, span, 8, 3 * embedding_std(model), 0)
    with model.hooks(fwd_hooks=[(access.EMBED_HOOK, noise)]):
        control = model(model.to_tokens(PROMPT).expand(8, -1))[:, -1].softmax(-1).mean(0)
    order = probs.argsort(descending=True)
    old = max(order[:10].tolist(), key=lambda t: float(probs[t] / control[t]))
    assert float(probs[old] / control[old]) > 1.5, "the tiny model must know something"
    new = next(int(t) for t in order[10:] if int(t) != old)
    return old, new


def _readout(model: HookedTransformer, token: int) -> torch.Tensor:
    """Unit direction of the residual that the unembedding of ``token`` reads (through ln_final)."""
    d = model.W_U[:, token].detach().clone()
    w = getattr(model.ln_final, "w", None)
    if access.is_bridge(model):  # Hugging Face Gemma RMSNorm scales by (1 + weight)
        w = 1.0 + model.ln_final.original_component.weight
    if w is not None:
        d = d * w.detach()
    if model_kind(model) == "gpt2":
        d = d - d.mean()
    return d / d.norm()


def _request() -> EditRequest:
    return EditRequest(PROMPT, SUBJECT, "Rome", "Paris")


def _add_direction(direction: torch.Tensor, scale: float, last: int):
    def fn(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        act = act.clone()
        act[:, last] += scale * direction
        return act

    return fn


def test_logit_lens_at_last_layer_is_model_output(model: HookedTransformer) -> None:
    last = access.n_layers(model) - 1
    _, cache = model.run_with_cache(PROMPT)
    lens_probs = logit_lens(model, cache[access.resid_post_hook_name(last)][0]).softmax(-1)
    torch.testing.assert_close(lens_probs, model(PROMPT)[0].softmax(-1), atol=1e-6, rtol=1e-5)


def test_tuned_lens_last_layer_identity_and_training_helps(model: HookedTransformer) -> None:
    config = TunedLensConfig(sequences=8, steps=40, batch_tokens=128, lr=3e-3)
    lens = train_tuned_lens(model, corpus=STATS_CORPUS, config=config, progress=False)
    last = access.n_layers(model) - 1
    h = torch.randn(5, model.cfg.d_model)
    assert torch.equal(lens.translate(h, last), h)
    assert float(lens.weight[last].abs().max()) == 0.0 and float(lens.bias[last].abs().max()) == 0
    # trained translators are not the identity, and beat the logit lens on held-out text
    assert float(lens.weight[0].abs().max()) > 0
    text = "Carol Smith said: 0123 jackdaws judge my quartz box."
    _, cache = model.run_with_cache(text)
    final = model(text)[0, 1:].log_softmax(-1)

    def kl(logits: torch.Tensor) -> float:
        logq = logits.log_softmax(-1)
        return float((final.exp() * (final - logq)).sum(-1).mean())

    h0 = cache[access.resid_post_hook_name(0)][0, 1:]
    assert kl(lens.logits(model, h0, 0)) < kl(logit_lens(model, h0))
    torch.testing.assert_close(
        lens.logits(model, cache[access.resid_post_hook_name(last)][0], last),
        logit_lens(model, cache[access.resid_post_hook_name(last)][0]),
    )


def test_tuned_lens_save_load_and_mismatch(model: HookedTransformer, tmp_path) -> None:
    lens = TunedLens.identity(model)
    lens.weight[0, 0, 1] = 0.5
    path = lens.save(tmp_path / "lens.pt")
    back = TunedLens.load(path)
    assert torch.equal(back.weight, lens.weight)
    back.check(model)
    other = rome_lens.models.access  # noqa: F841  (keeps the import used)
    (tmp_path / "bad.pt").write_bytes(b"not a lens")
    with pytest.raises(rome_lens.CorruptEditFileError):
        TunedLens.load(tmp_path / "bad.pt")
    from tiny import tiny_model

    with pytest.raises(rome_lens.FingerprintMismatchError):
        back.check(tiny_model(model_kind(model), seed=1))


def test_rome_edit_upstream_states_bit_identical(model: HookedTransformer, hparams) -> None:
    request = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
    edit = cached_edit(model, request, 1, hparams)
    before = access.parameters_checksum(model)
    old, new = _objects(model)
    report = probe_edit(model, edit, lenses=("logit",), n_contexts=1, object_tokens=(old, new))
    assert report.structural["identical"]
    assert access.key_hook_name(1) in report.structural["compared"]
    assert access.resid_pre_hook_name(1) in report.structural["compared"]
    assert access.parameters_checksum(model) == before  # model left as it was
    # pre-edit rows below L equal post-edit rows exactly (the structural fact, in the table)
    df = report.to_dataframe()
    low = df[(df.layer < 1) & (df.prompt_kind == "edit")]
    pre = low[low.condition == "pre"].set_index(["position", "layer", "object"]).prob
    post = low[low.condition == "post"].set_index(["position", "layer", "object"]).prob
    assert (pre == post).all()


def test_batched_decode_matches_one_vector_at_a_time(model: HookedTransformer) -> None:
    from rome_lens.audit.probe import _decode_groups

    gen = torch.Generator().manual_seed(0)
    n_layers, d = model.cfg.n_layers, model.cfg.d_model
    groups = [torch.randn(rows, n_layers, 2, d, generator=gen) for rows in (1, 3, 2)]
    decoded = _decode_groups(model, groups, "logit", None, chunk_rows=5)  # several chunks
    for g, p in zip(groups, decoded, strict=True):
        expected = torch.stack([
            torch.stack([logit_lens(model, g[r, layer]).softmax(-1) for layer in range(n_layers)])
            for r in range(g.shape[0])
        ]).mean(0)
        assert p.shape == expected.shape
        torch.testing.assert_close(p, expected, atol=1e-6, rtol=1e-5)


def test_baseline_reuse_matches_a_fresh_probe(model: HookedTransformer, hparams) -> None:
    request = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
    edit = cached_edit(model, request, 1, hparams)
    old, new = _objects(model)
    kwargs: dict[str, Any] = {"lenses": ("logit",), "n_contexts": 1, "object_tokens": (old, new)}
    first = probe_edit(model, edit, **kwargs)
    erase = HookEdit(1, request, [(access.mlp_out_hook_name(1),
                                   lambda act, hook=None: act * 0.5)])
    fresh = probe_edit(model, erase, **kwargs)
    reused = probe_edit(model, erase, baseline=first, **kwargs)
    key = ["condition", "prompt_index", "position", "layer", "lens", "object"]
    a = fresh.to_dataframe().sort_values(key).reset_index(drop=True)
    b = reused.to_dataframe().sort_values(key).reset_index(drop=True)
    assert len(a) == len(b) == len(first.records)
    assert (a["rank"] == b["rank"]).all()
    torch.testing.assert_close(torch.tensor(a["prob"].values), torch.tensor(b["prob"].values))
    assert fresh.verdict == reused.verdict and fresh.output == reused.output
    assert fresh.attacks == reused.attacks
    other = EditRequest("{} works in", "Alice Smith", "Paris", "Rome")
    with pytest.raises(InvalidRequestError, match="baseline"):
        probe_edit(model, erase, other, baseline=first, **kwargs)
    with pytest.raises(InvalidRequestError, match="lens"):
        probe_edit(model, erase, baseline=first, lenses=("logit", "tuned"),
                   object_tokens=(old, new), lens=TunedLens.identity(model))


def test_structural_check_catches_upstream_change(model: HookedTransformer) -> None:
    old, new = _objects(model)
    bad = HookEdit(1, _request(), [(access.resid_pre_hook_name(0),
                                    lambda act, hook=None: act + 0.1)])
    with pytest.raises(EditStateError, match="upstream"):
        probe_edit(model, bad, lenses=("logit",), n_contexts=0, object_tokens=(old, new))


def test_added_direction_without_removal_is_insertion(model: HookedTransformer) -> None:
    old, new = _objects(model)
    n_tok = int(model.to_tokens(PROMPT).shape[1])
    direction = _readout(model, new)
    hook = access.mlp_out_hook_name(1)
    # smallest scale (doubling) that makes the new object win at the output
    scale = 0.5
    while True:
        with model.hooks(fwd_hooks=[(hook, _add_direction(direction, scale, n_tok - 1))]):
            probs = _final_probs(model, PROMPT)
        if int(probs.argmax()) == new:
            break
        scale *= 1.5
        assert scale < 1e4
    edit = HookEdit(1, _request(), [(hook, _add_direction(direction, scale, n_tok - 1))])
    # a random tiny model knows little: its subject lifts the original only ~1.5-3x over the
    # subject-free control, so the control threshold is lowered accordingly
    report = probe_edit(model, edit, lenses=("logit",), n_contexts=0, object_tokens=(old, new),
                        control_samples=8, rule=VerdictRule(control_ratio=1.2))
    assert report.output["post_new"] > report.output["post_old"]
    assert report.best_rank("old", position="last") <= report.rule.top_k
    assert report.verdict == INSERTION


def test_zeroing_the_original_everywhere_downstream_is_not_insertion(
    model: HookedTransformer,
) -> None:
    old, new = _objects(model)
    d_old, d_new = _readout(model, old), _readout(model, new)

    def erase(act: torch.Tensor, hook: Any = None) -> torch.Tensor:
        # remove what the unembedding of the original reads, push it down, add the new object
        norm = act.norm(dim=-1, keepdim=True)
        act = act - (act @ d_old)[..., None] * d_old
        return act - 0.5 * norm * d_old + 0.5 * norm * d_new

    hooks = [(access.resid_post_hook_name(lyr), erase) for lyr in range(1, model.cfg.n_layers)]
    edit = HookEdit(1, _request(), hooks)
    report = probe_edit(model, edit, lenses=("logit",), n_contexts=0, object_tokens=(old, new))
    df = report.to_dataframe()
    post_old = df[(df.condition == "post") & (df.object == "old") & (df.layer >= 1)]
    assert post_old["rank"].min() > report.rule.top_k
    assert report.verdict == ERASURE
    assert report.verdict != INSERTION


def test_consistency_and_bad_input(model: HookedTransformer, hparams) -> None:
    request = EditRequest("{} lives in", "Alice Smith", "Paris", "Rome")
    edit = cached_edit(model, request, 1, hparams)
    old, new = _objects(model)
    report = probe_edit(model, edit, lenses=("logit",), n_contexts=0, object_tokens=(old, new),
                        consistency=[("Alice Smith is from", "Xa", "Yb")])
    row = report.consistency[0]
    assert row["pre_world"] in ("old", "new") and 0 <= row["post_p_new"] <= 1
    with pytest.raises(InvalidRequestError, match="same token"):
        probe_edit(model, edit, lenses=("logit",), n_contexts=0)  # " Paris" / " Rome" share " "
    with pytest.raises(InvalidRequestError, match="lens"):
        probe_edit(model, edit, lenses=("bogus",), object_tokens=(old, new))
    with pytest.raises(rome_lens.SubjectNotFoundError):
        probe_edit(model, edit, lenses=("logit",), paraphrases=["nobody here"],
                   object_tokens=(old, new))
    assert not rome_lens.applied_edits(model)


@pytest.mark.parametrize("objective", ["erasure", "max_entropy"])
def test_erasure_objectives_lower_the_original(
    model: HookedTransformer, hparams, objective: str
) -> None:
    # the subject ends the prompt, so delta acts on the position that predicts the object
    request = EditRequest("She met {}", "Alice Smith", "Paris", "Rome")
    stats = key_stats(model, 1, hparams)
    prompt_ids = model.to_tokens(request.text)
    true_ids = rome_lens.requests.target_tokens(model, "Rome")
    ids = torch.cat([prompt_ids[0], true_ids[:-1]])[None]

    def p_true() -> float:
        logp = model(ids)[0, -len(true_ids):].log_softmax(-1)
        return float(logp.gather(-1, true_ids[:, None]).sum().exp())

    def entropy() -> float:
        logp = model(ids)[0, prompt_ids.shape[1] - 1].log_softmax(-1)
        return float(-(logp.exp() * logp).sum())

    before_p, before_h = p_true(), entropy()
    # p(original) is tiny on a random model: its gradient is below the weight decay's, and
    # max-entropy's loss starts below the early-stop level; erasure's stop is relative to its
    # start (values.finished), so it keeps the default level and still runs
    stop = hparams.early_stop_loss if objective == "erasure" else 0.0
    assert objective != "erasure" or before_p < stop  # an absolute stop would end at step 0
    hp = dataclasses.replace(hparams, early_stop_loss=stop, v_weight_decay=0.0,
                             v_num_grad_steps=20)
    edit = rome_lens.compute_rome(model, request, layer=1, hparams=hp, stats=stats,
                                  objective=objective)
    assert edit.info["objective"] == objective
    with edit.applied(model):
        after_p, after_h = p_true(), entropy()
    losses = edit.info["losses"]
    assert losses[-1] < losses[0]
    if objective == "erasure":
        assert after_p < before_p and len(losses) > 1
    else:
        assert after_h > before_h + 0.01
    with pytest.raises(InvalidRequestError, match="target_true"):
        rome_lens.compute_rome(model, EditRequest("She met {}", "Alice Smith", "Paris"),
                               layer=1, hparams=hparams, stats=stats, objective=objective)


def test_erasure_stops_relative_to_its_start() -> None:
    # terms [0.04, 0.001, 0.01] of [0.04, 0.04, 1.0] at the start: the second fell 40-fold
    # and stops; the third fell 100-fold but its total (with KL and decay) is still too high
    done = finished([0.045, 0.01, 0.06], [0.04, 0.001, 0.01], [0.04, 0.04, 1.0], "erasure", 0.05)
    assert done.tolist() == [False, True, False]
    assert finished([0.04, 0.06], [0.04, 0.06], [1.0, 1.0], "insertion", 0.05).tolist() == [
        True, False]
    assert finished([0.0], [0.0], [0.0], "erasure", 0.05).tolist() == [True]  # nothing to erase


def test_unknown_objective(model: HookedTransformer, hparams) -> None:
    with pytest.raises(InvalidRequestError, match="objective"):
        rome_lens.compute_rome(model, _request(), layer=1, hparams=hparams,
                               objective="amplify")  # type: ignore[arg-type]


def test_cli_tuned_lens_trains_caches_and_saves(
    model: HookedTransformer, tmp_path, monkeypatch, capsys
) -> None:
    import json

    from rome_lens import cli

    monkeypatch.setenv("ROME_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rome_lens, "load_model", lambda name=None: model)
    text = tmp_path / "corpus.txt"
    text.write_text(" ".join(STATS_CORPUS) * 4)
    args = ["tuned-lens", "--steps", "5", "--sequences", "4", "--corpus", str(text), "--json"]
    assert cli.main([*args, "--save", str(tmp_path / "lens.pt")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["fingerprint"] == access.weights_fingerprint(model)
    saved = TunedLens.load(tmp_path / "lens.pt")
    assert saved.n_layers == model.cfg.n_layers
    assert list((tmp_path / "cache" / "tuned_lens").glob("*.pt"))  # cached for probe_edit
    assert cli.main(args) == 0  # second call loads the cached lens: same lens
    second = json.loads(capsys.readouterr().out)
    assert second["info"] == first["info"]


def test_tuned_lens_is_the_base_models_with_an_edit_applied(
    model: HookedTransformer, hparams, monkeypatch
) -> None:
    from rome_lens.audit import lens as lens_module

    config = TunedLensConfig(sequences=4, steps=5, batch_tokens=64)
    unedited = lens_module.tuned_lens(model, corpus=STATS_CORPUS, config=config, progress=False)
    edit = cached_edit(model, EditRequest("{} lives in", "Alice Smith", "Paris", "Rome"), 1,
                       hparams)
    with edit.applied(model):
        assert access.weights_fingerprint(model) != unedited.fingerprint
        # trained on the unedited weights even now: bit-identical to the unedited training
        retrained = train_tuned_lens(model, corpus=STATS_CORPUS, config=config, progress=False)
        assert rome_lens.applied_edits(model) == [edit]  # the edit came back after training
        assert torch.equal(retrained.weight, unedited.weight)
        assert retrained.fingerprint == unedited.fingerprint
        retrained.check(model)  # an edited model is read through its base model's lens

        def no_training(*args: Any, **kwargs: Any) -> TunedLens:
            raise AssertionError("the base model's lens is cached: no training")

        monkeypatch.setattr(lens_module, "train_tuned_lens", no_training)
        cached = lens_module.tuned_lens(model, corpus=STATS_CORPUS, config=config)
        assert torch.equal(cached.weight, unedited.weight)
        assert torch.equal(cached.bias, unedited.bias)
        assert cached.fingerprint == rome_lens.edits.base_fingerprint(model)


def _rome_lens_imports(tree: Any) -> list[tuple[str, list[str], bool]]:
    """``(module, names, inside a function)`` of every import of rome_lens at run time.

    ``if TYPE_CHECKING:`` blocks are left out (they import nothing at run time).
    """
    import ast

    out: list[tuple[str, list[str], bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and (child.module or "").startswith("rome_lens"):
                out.append((str(child.module), [a.name for a in child.names], in_function))
            if isinstance(child, ast.Import):
                out.extend((a.name, [], in_function) for a in child.names
                           if a.name.startswith("rome_lens"))
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(tree, False)
    return out


def test_audit_seams_public_names_and_no_import_cycle() -> None:
    import ast
    from pathlib import Path

    package = Path(rome_lens.__file__).parent

    def module_path(module: str) -> Path:
        path = package.parent / module.replace(".", "/")
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    def imports(module: str) -> list[tuple[str, list[str], bool]]:
        return _rome_lens_imports(ast.parse(module_path(module).read_text()))

    def runtime_deps(module: str) -> list[str]:
        """Modules ``module`` imports at import time (``from pkg import submodule`` too)."""
        found = [s for s, _, in_function in imports(module) if not in_function]
        found += [f"{s}.{n}" for s, names, in_function in imports(module) if not in_function
                  for n in names if module_path(f"{s}.{n}").exists()]
        return found

    audit = [f"rome_lens.audit.{p.stem}" for p in (package / "audit").glob("*.py")]
    for module in audit:
        for source, names, in_function in imports(module):
            if source.startswith("rome_lens.audit"):
                continue
            assert not [n for n in names if n.startswith("_")], (module, source, names)
            assert not in_function, f"{module} imports {source} inside a function"
    # nothing audit needs at import time imports audit back (the top-level package aside,
    # which only re-exports)
    seen, todo = set(), [s for m in audit for s in runtime_deps(m)]
    while todo:
        module = todo.pop()
        if module in seen or module == "rome_lens" or not module_path(module).exists():
            continue
        seen.add(module)
        assert module.startswith("rome_lens.audit") or not any(
            s.startswith("rome_lens.audit") for s, _, _ in imports(module)
        ), f"{module} imports rome_lens.audit: an import cycle"
        todo += runtime_deps(module)
    assert {"rome_lens.edits.registry", "rome_lens.models.access", "rome_lens.statistics.corpus",
            "rome_lens.tracing.causal"} <= seen


def test_audit_functions_stay_readable() -> None:
    """No function of the audit package is longer than 80 lines (its docstring aside)."""
    import ast
    from pathlib import Path

    for path in (Path(rome_lens.__file__).parent / "audit").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            first = node.body[0]
            doc = (first.end_lineno or first.lineno) - first.lineno + 1 if (
                isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)) else 0
            length = (node.end_lineno or node.lineno) - node.lineno + 1 - doc
            assert length <= 80, f"{path.name}:{node.lineno} {node.name} has {length} lines"
