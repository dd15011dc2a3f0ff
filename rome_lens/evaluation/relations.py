"""CounterFact relations and the second hops a ripple evaluation follows (one table).

CounterFact's flat layout (EasyEdit, ``counterfact-*.json``) drops the Wikidata relation id of
a record; only its prompt is left. The prompt's template (the prompt with ``{}`` for the
subject) names the relation almost always: :data:`RELATIONS` lists, per relation id, the
templates CounterFact writes it with (read off ``counterfact-train.json``/``-dev.json`` and
checked against ``known_1000.json``, which keeps ``relation_id`` beside the same templates). A
few templates are shared ("{} is located in" is a country, a continent or a region; "{} plays"
a genre, an instrument or a sport): :func:`assign_relations` settles those by the objects, the
relation whose unambiguous records use the record's true and new objects winning.

:data:`SECOND_HOPS` is the table of RippleEdits' Compositionality I: after an edit
``(s, r, o -> o*)``, a fact ``(o*, r2, f(o*))`` of the new object should carry over to ``s``.
Each row names ``r`` and ``r2``, the two-hop question on the subject (``composite``, "s, r then
r2") and the one-hop question on an object (``on_object``), and the relations whose CounterFact
objects are the candidate answers of ``r2`` (the model's answer is read by ranking those).
Adding a hop is adding a row; adding a relation is adding a :class:`Relation`.

Example:
    >>> RELATIONS["P17"]
    Relation(P17 country, 6 templates)
    >>> [hop.second for hop in hops_from("P27")]
    ['P30', 'P36', 'P37']
    >>> hops_from("P131")[0].composite.format("The Eiffel Tower")
    'The Eiffel Tower is located in the country of'
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rome_lens.evaluation.counterfact import CounterFactRecord


@dataclass(frozen=True, repr=False)
class Relation:
    """A CounterFact relation: its Wikidata id, a name, and the templates that write it.

    Attributes:
        id: the Wikidata property id, e.g. ``"P17"``.
        name: a short name, e.g. ``"country"``.
        templates: prompt templates (``{}`` for the subject) CounterFact writes it with; a
            template may also belong to other relations (then the objects decide).
        one_to_many: a subject can have several true objects (twin cities, instruments): the
            other objects should survive an edit (RippleEdits' Preservation).
    """

    id: str
    name: str
    templates: tuple[str, ...]
    one_to_many: bool = False

    def __repr__(self) -> str:
        return f"Relation({self.id} {self.name}, {len(self.templates)} templates)"


@dataclass(frozen=True, repr=False)
class SecondHop:
    """One row of the Compositionality I table: ``(s, first, o)`` then ``(o, second, f(o))``.

    Attributes:
        first: the edited relation ``r`` (a key of :data:`RELATIONS`).
        second: the object's relation ``r2`` (a Wikidata id; its answers' relation).
        composite: the two-hop question on the subject ("s, r then r2"), ``{}`` for ``s``.
        on_object: the one-hop question ``r2`` on an object, ``{}`` for ``o``.
        answers_from: relation ids whose CounterFact objects (true and new) are the candidate
            answers of ``r2``.
    """

    first: str
    second: str
    composite: str
    on_object: str
    answers_from: tuple[str, ...]

    def __repr__(self) -> str:
        return f"SecondHop({self.first} then {self.second}: {self.composite!r})"


def _relation(rid: str, name: str, *templates: str, one_to_many: bool = False) -> Relation:
    return Relation(rid, name, tuple(templates), one_to_many)


# Place templates shared by several relations: the objects decide (see assign_relations).
_WHERE = ("{} is located in", "{} is in", "{}, in")

RELATIONS: dict[str, Relation] = {r.id: r for r in (
    _relation("P17", "country", "{} is located in the country of", "{}, located in",
              "{}, which is located in", *_WHERE),
    _relation("P30", "continent", "{} is located in the continent",
              "{} belongs to the continent of", "{} is a part of the continent of", *_WHERE),
    _relation("P131", "located in (region)", "{} is within", "{} can be found in", *_WHERE),
    _relation("P276", "location", "The location of {} is", "Where is {}? It is located in",
              "{} can be found in", *_WHERE),
    _relation("P19", "place of birth", "{} was born in", "{} is originally from",
              "{} was originally from", "{} is native to", "{} was native to",
              "{} originated from", "{} originates from"),
    _relation("P20", "place of death", "{} died in", "{} died at", "{} died in the city of",
              "{} expired at", "{} lost their life at", "{} passed away at",
              "{} passed away in", "{} succumbed at", "{}'s life ended in"),
    _relation("P27", "country of citizenship", "{} is a citizen of", "{}, a citizen of",
              "{} has a citizenship from", "{} holds a citizenship from",
              "{}, who has a citizenship from", "{}, who holds a citizenship from",
              "{}, who is a citizen of", "{}, who has a citizenship of",
              "{} has a citizenship of"),
    _relation("P36", "capital", "The capital of {} is", "The capital city of {} is",
              "{}'s capital is", "{}'s capital city is", "{}'s capital,", "{}'s capital city,",
              "{}, which has the capital", "{}, which has the capital city"),
    _relation("P37", "official language", "The official language of {} is",
              "In {}, an official language is", "In {}, the language spoken is",
              "In {}, they understand", "The law in {} declares the language",
              one_to_many=True),
    _relation("P39", "position held", "{} holds the position of", "{} has the position of",
              "{}'s position is", "{} holds the title of", "{} is a",
              "{}, who has the position of", "{}, who holds the position of",
              "{}, whose position is that of"),
    _relation("P101", "field of work", "The domain of activity of {} is",
              "The domain of work of {} is", "The expertise of {} is", "{} specializes in",
              "{} works in the area of", "{} works in the field of", "{}'s area of work is",
              "{}'s domain of activity is", "{}'s domain of work is", "{}'s expertise is",
              one_to_many=True),
    _relation("P103", "native language", "The mother tongue of {} is",
              "The native language of {} is", "{} is a native speaker of",
              "{} spoke the language", "{}, a native", "{}, speaker of"),
    _relation("P106", "occupation", "The occupation of {} is", "The profession of {} is",
              "{} works as", "{}'s occupation is", "{}'s profession is a",
              "{}'s profession is an", "{}, who works as", one_to_many=True),
    _relation("P108", "employer", "{} is employed by", "{} works for",
              "{}, who is employed by", "{}, who works for", "{}, of"),
    _relation("P127", "owned by", "{} is owned by", "{} owner", "{}'s owner", "{}, by",
              "{}, from", "{} is from"),
    _relation("P136", "genre", "The genre played by {} is", "What does {} play? They play",
              "{} is known for performing", "{} performs", "{}, who plays", "{} plays",
              one_to_many=True),
    _relation("P138", "named after", "{} is named after", "{} is named for",
              "{} is called after", "{} was called after", "{} was named after",
              "{} was named for", "{}, called after", "{}, named after", "{}, named for",
              "{}, which is called after", "{}, which is named after", "{}, which is named for",
              "{}, which was called after", "{}, which was named after",
              "{}, which was named for"),
    _relation("P140", "religion", "The official religion of {} is",
              "{} follows the religion of", "{} is affiliated with the religion",
              "{} is follower of"),
    _relation("P159", "headquarters location", "The headquarter of {} is in",
              "The headquarter of {} is located in", "The headquarters of {} is in",
              "{} is headquartered in", "{}'s headquarters are in",
              "{}, whose headquarters are in", "{} is based in"),
    _relation("P176", "manufacturer", "{} is produced by", "{}, produced by",
              "{}, a product manufactured by", "{} is developed by", "{}, developed by",
              "{} is created by", "{}, created by", "{} is a product of"),
    _relation("P178", "developer", "{} was developed by", "{}, a product developed by",
              "{} was created by", "{}, a product created by", "{} was a product of",
              "{}, a product of", "{} is developed by", "{}, developed by", "{} is created by",
              "{}, created by", "{} is a product of"),
    _relation("P190", "twin city", "{} is a twin city of", "The twin city of {} is",
              "What is the twin city of {}? It is", one_to_many=True),
    _relation("P264", "record label", "The music label representing {} is",
              "The music label that is representing {} is", "{} is represented by music label",
              "{} is represented by record label", "{} label :", "{} recorded for",
              "{}'s music label is", "{}'s record company is", "{}'s record label is",
              "{}, released by", "{}, that is represented by", "{}, which is represented by"),
    _relation("P364", "original language", "The original language of {} is",
              "The original language of {} was", "The language of {} is",
              "The language of {} was"),
    _relation("P407", "language of work", "{} is written in", "{} was written in",
              "The language of {} is", "The language of {} was"),
    _relation("P1412", "language spoken or written", "{} speaks", "{} speaks the language",
              "{} writes in", "The language used by {} is", one_to_many=True),
    _relation("P413", "position played", "{} plays as", "{} plays in the position of",
              "{}, who plays the position", "Which position does {} play? They play as",
              "{}, the"),
    _relation("P449", "original network", "{} debuted on", "{} is to debut on",
              "{} premiered on", "{} premieres on", "{} was originally aired on",
              "{} was released on"),
    _relation("P463", "member of", "{} is a member of", "{} belongs to the organization of",
              "{} is a part of the", "{} is affiliated with", "{} is affiliated with the",
              one_to_many=True),
    _relation("P495", "country of origin", "{} was created in the country of",
              "{}, that originated in", "{}, created in", "{}, that was created in",
              "{} was created in", "{} originated in", "{} was developed in",
              "{}, developed in", "{}, that was developed in", "{} was formulated in",
              "{}, formulated in", "{}, that was formulated in", "{} from", "{} was from",
              "{}, that was from", "{}, from", "{} is from"),
    _relation("P641", "sport", "{} is a professional", "{} professionally plays the sport",
              "What sport does {} play? They play", "{} plays"),
    _relation("P740", "location of formation", "{} formed in", "{} was formed in",
              "{}, that was formed in", "{} was founded in", "{} that was founded in",
              "{}, founded in", "{} started in", "{} was started in", "{}, that was started in",
              "{} originated in", "{}, that originated in", "{} was created in",
              "{}, that was created in", "{}, created in"),
    _relation("P937", "work location", "{} worked in", "{} worked in the city of",
              "{} used to work in", "{} took up work in", "{} found employment in",
              "{} was employed in"),
    _relation("P1303", "instrument", "{} plays the instrument", "{} plays the",
              "{} performs on the", "{}, performing on the", "{}, playing the", "{}, the",
              "{} plays", one_to_many=True),
)}

_COUNTRIES = ("P17", "P27", "P495")
# CounterFact's capitals miss many (Tokyo, Ottawa): other city-valued relations add them.
_CITIES = ("P36", "P19", "P20", "P159", "P937")
_IN_COUNTRY = "{} is located in the country of"
_COMPANY_COUNTRY = "{} is headquartered in the country of"


def _to_country(first: str, composite: str, on_object: str = _IN_COUNTRY) -> SecondHop:
    return SecondHop(first, "P17", composite, on_object, _COUNTRIES)


def _from_country(first: str, verb: str) -> tuple[SecondHop, ...]:
    """Continent, capital and official language of a country-valued relation's object."""
    return (
        SecondHop(first, "P30", f"{verb} a country in the continent of",
                  "{} is located in the continent of", ("P30",)),
        SecondHop(first, "P36", f"{verb} a country whose capital is", "The capital of {} is",
                  _CITIES),
        SecondHop(first, "P37", f"{verb} a country whose official language is",
                  "The official language of {} is", ("P37",)),
    )


SECOND_HOPS: tuple[SecondHop, ...] = (
    # a place (city or region) -> its country
    _to_country("P131", "{} is located in the country of"),
    _to_country("P276", "{} is located in the country of"),
    _to_country("P19", "{} was born in the country of"),
    _to_country("P20", "{} died in the country of"),
    _to_country("P937", "{} worked in the country of"),
    _to_country("P159", "{} is headquartered in the country of"),
    _to_country("P740", "{} was founded in the country of"),
    _to_country("P190", "{} is a twin city of a city in the country of"),
    _to_country("P36", "The capital of {} is a city in the country of"),
    # a company or network -> the country of its headquarters
    _to_country("P176", "{} is produced by a company from the country of", _COMPANY_COUNTRY),
    _to_country("P178", "{} is developed by a company from the country of", _COMPANY_COUNTRY),
    _to_country("P108", "{} works for a company from the country of", _COMPANY_COUNTRY),
    _to_country("P127", "{} is owned by a company from the country of", _COMPANY_COUNTRY),
    _to_country("P449", "{} premiered on a network from the country of", _COMPANY_COUNTRY),
    # a country -> its continent, capital, official language
    *_from_country("P17", "{} is located in"),
    *_from_country("P27", "{} is a citizen of"),
    *_from_country("P495", "{} originated in"),
)


def hops_from(relation: str, hops: Sequence[SecondHop] = SECOND_HOPS) -> list[SecondHop]:
    """The rows of ``hops`` whose first relation is ``relation`` (empty for a relation without).

    Example:
        >>> [hop.second for hop in hops_from("P159")]
        ['P17']
    """
    return [hop for hop in hops if hop.first == relation]


def relations_of_template(template: str) -> tuple[str, ...]:
    """The relation ids whose templates include ``template`` (in :data:`RELATIONS` order).

    Example:
        >>> relations_of_template("{} is a citizen of")
        ('P27',)
        >>> relations_of_template("{} plays")
        ('P136', 'P641', 'P1303')
    """
    return tuple(rid for rid, rel in RELATIONS.items() if template in rel.templates)


def assign_relations(records: Iterable[CounterFactRecord]) -> dict[int, str]:
    """The relation id of each record, read from its prompt template (and objects if shared).

    A template of one relation names it. For a template several relations share, the objects
    decide: each candidate relation counts the records whose template is its alone and whose
    true or new object is this record's true or new object; the relation with the most wins
    (ties: the first in :data:`RELATIONS`). Records whose template no relation has, or whose
    objects no candidate relation uses, get no id.

    Args:
        records: CounterFact records (the more, the better the objects settle shared templates).

    Returns:
        ``{case_id: relation id}`` for the records a relation was found for.

    Example:
        >>> from rome_lens.evaluation import parse_record
        >>> rec = parse_record({"case_id": 7, "prompt": "Ada is a citizen of", "subject": "Ada",
        ...                     "target_new": "Peru", "ground_truth": "Chile"})
        >>> assign_relations([rec])
        {7: 'P27'}
    """
    records = list(records)
    usage: dict[str, Counter[str]] = defaultdict(Counter)
    for rec in records:
        candidates = relations_of_template(rec.request.template)
        if len(candidates) == 1:
            usage[candidates[0]].update((rec.target_true, rec.target_new))
    found = {}
    for rec in records:
        rid = _settle(relations_of_template(rec.request.template), rec, usage)
        if rid is not None:
            found[rec.case_id] = rid
    return found


def _settle(
    candidates: tuple[str, ...], rec: CounterFactRecord, usage: Mapping[str, Counter[str]]
) -> str | None:
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    votes = [usage[rid][rec.target_true] + usage[rid][rec.target_new] for rid in candidates]
    best = max(votes)
    return candidates[votes.index(best)] if best > 0 else None


def relation_objects(
    records: Iterable[CounterFactRecord], relations: Mapping[int, str]
) -> dict[str, tuple[str, ...]]:
    """Per relation id, the sorted true and new objects of its records (candidate answers).

    Example:
        >>> from rome_lens.evaluation import parse_record
        >>> rec = parse_record({"case_id": 7, "prompt": "Ada is a citizen of", "subject": "Ada",
        ...                     "target_new": "Peru", "ground_truth": "Chile"})
        >>> relation_objects([rec], {7: "P27"})
        {'P27': ('Chile', 'Peru')}
    """
    objects: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        if rec.case_id in relations:
            objects[relations[rec.case_id]].update((rec.target_true, rec.target_new))
    return {rid: tuple(sorted(found)) for rid, found in sorted(objects.items())}
