"""Edit forensics on the embedded model: a ROME edit found, named, read and reversed blind."""

from __future__ import annotations

import rome_lens
from rome_lens._typing import Model as HookedTransformer
from rome_lens.audit import ScanConfig, scan
from rome_lens.models import access

#: Candidate subjects: the edited one among well-known entities of several kinds.
CANDIDATES = [
    "The Eiffel Tower", "Danielle Darrieux", "Edwin of Northumbria", "Toko Yasuda",
    "Autonomous University of Madrid", "Thomas Joannes Stieltjes", "Anaal Nathrakh", "Apple A5",
    "Ferrari F40", "Go Hyeon-jeong", "Saint Petersburg", "Kharkiv", "Lyon", "Gilad Atzmon",
    "Laurent Cars", "Heath Brothers", "Platform Controller Hub", "Emilio Lussu", "Nissan Laurel",
    "Toyota Cresta", "The Louvre", "Big Ben", "Mount Everest", "Albert Einstein", "Barack Obama",
    "Microsoft", "Nintendo", "The Beatles", "Pablo Picasso", "Leonardo da Vinci", "Amazon River",
    "Sahara", "Tokyo Tower", "Statue of Liberty", "Colosseum", "Taj Mahal",
    "Golden Gate Bridge", "Argentine Football Association", "BBC", "Toyota",
]


def test_a_rome_edit_is_found_named_read_and_reversed_without_base_weights(
    gemma: HookedTransformer, eiffel_edit: rome_lens.RomeEdit
) -> None:
    prompt = eiffel_edit.request.text
    before = rome_lens.top_tokens(gemma, prompt, 1)[0][0]
    checksum = access.parameters_checksum(gemma)
    assert scan(gemma, use_registry=False, candidates=CANDIDATES).findings == ()
    with eiffel_edit.applied(gemma):
        report = scan(gemma, use_registry=False, candidates=CANDIDATES, probes=[prompt])
        finding = report.findings[0]
        assert (finding.layer, finding.mode, finding.subject) == (1, "subject",
                                                                  "The Eiffel Tower")
        # measured z 22-39 for ROME edits at layer 1 (benchmarks/forensics_subspace.py)
        assert finding.score is not None and finding.score >= 2 * ScanConfig().match_threshold
        assert "rome" in [o.strip().casefold() for o in finding.objects[:10]], finding.objects
        assert report.reversal is not None
        with report.reversal.applied(gemma):
            assert rome_lens.top_tokens(gemma, prompt, 1)[0][0] == before
    assert access.parameters_checksum(gemma) == checksum
