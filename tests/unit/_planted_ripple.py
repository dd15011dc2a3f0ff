"""A small world of planted facts for the smoke run of ``benchmarks/ripple.py --model tiny``.

``FACTS`` (prompt -> answer) is what :func:`_knowing.knowing_model` teaches a tiny model;
``RECORDS`` is a CounterFact-layout file about the same world: four place edits whose new city
lies in another country (each gives a Compositionality I case the tiny model knows both hops
of), facts of the cities' countries (they confirm the second hops), and one other relation of
a subject (relation specificity).
"""

from __future__ import annotations

from typing import Any

_CITY_COUNTRY = {"Rome": "Italy", "Paris": "France", "Oslo": "Norway", "Lima": "Peru"}
# subject -> (true city, new city)
_EDITS = {"Zog": ("Rome", "Oslo"), "Bax": ("Paris", "Lima"), "Kel": ("Oslo", "Rome"),
          "Mup": ("Lima", "Paris")}

FACTS: dict[str, str] = {
    **{f"{s} is within": old for s, (old, _) in _EDITS.items()},
    **{f"{s} can be found in": old for s, (old, _) in _EDITS.items()},
    **{f"{s} is located in the country of": _CITY_COUNTRY[old] for s, (old, _) in _EDITS.items()},
    **{f"{city} is located in the country of": c for city, c in _CITY_COUNTRY.items()},
    "The official language of Zog is": "Latin",
}


def _record(case_id: int, prompt: str, subject: str, new: str, true: str,
            **extra: str) -> dict[str, Any]:
    return {"case_id": case_id, "prompt": prompt, "subject": subject, "target_new": new,
            "ground_truth": true, **extra}


RECORDS: list[dict[str, Any]] = [
    *(_record(i, f"{s} is within", s, new, old, rephrase_prompt=f"{s} can be found in")
      for i, (s, (old, new)) in enumerate(_EDITS.items())),
    _record(10, "The official language of Zog is", "Zog", "Dutch", "Latin"),
    *(_record(20 + i, f"{city} is located in the country of", city,
              "Peru" if country != "Peru" else "Italy", country)
      for i, (city, country) in enumerate(_CITY_COUNTRY.items())),
]
