"""One city, three source systems: the shared residents as each source records them.

Every simulator draws its people from a :class:`Population`; here each source gets its own
:class:`SourceView` of one base population, which adds that source's clerical noise to the people
it renders, deterministically per (source, resident):

- a homophone (同音字) typo in one given-name character (张浩宇 → 张昊宇);
- a changed phone number (the family moved or changed operator);
- no 身份证 number for a child (registered at birth, before the number is issued), in sources
  that register newborns.

A view remembers whom it rendered under which (name, birth date), so that a test or benchmark can
tell, for every stored source Patient, which resident it really is: the planted truth the MPI's
golden records are measured against.
"""

from __future__ import annotations

import dataclasses
import random
from collections import defaultdict
from typing import Any

from fhir_server.simulators.population import Child, Population, Resident

# Characters of the population's given-name pools with a same-sounding character a clerk might
# type instead (the pinyin input method offers both).
HOMOPHONES = {
    "浩": "昊", "昊": "皓", "宇": "雨", "轩": "萱", "子": "梓", "梓": "子", "睿": "瑞", "泽": "择", "博": "波",
    "文": "雯", "俊": "骏", "豪": "毫", "明": "铭", "铭": "明", "杰": "洁", "晨": "辰", "辰": "晨", "天": "添",
    "宸": "臣", "逸": "亿", "航": "杭", "嘉": "佳", "佳": "嘉", "恒": "衡", "欣": "馨", "怡": "仪", "涵": "晗",
    "诗": "师", "雨": "宇", "桐": "彤", "思": "丝", "语": "雨", "琪": "琦", "悦": "越", "一": "依", "曦": "熙",
    "婉": "宛", "清": "青", "晴": "情", "瑶": "遥", "伟": "玮", "强": "蔷", "磊": "蕾", "军": "君", "勇": "永",
    "涛": "韬", "斌": "彬", "超": "潮", "刚": "钢", "平": "萍", "辉": "晖", "华": "桦", "飞": "菲", "芳": "方",
    "娜": "那", "敏": "闽", "静": "婧", "丽": "莉", "艳": "燕", "娟": "鹃", "玲": "铃", "红": "虹", "琴": "勤",
    "洁": "杰", "慧": "惠", "颖": "英", "萍": "平",
}


@dataclasses.dataclass(frozen=True)
class Noise:
    """Rates (0..1) of each kind of clerical noise in one source's records."""

    name_typo: float = 0.0
    phone_change: float = 0.0
    child_without_id: float = 0.0


class SourceView(Population):
    """The residents of ``base`` as the source ``source`` records them (see the module doc)."""

    def __init__(self, base: Population, source: str, noise: Noise) -> None:
        super().__init__(base.seed, base.reference)
        self.source, self.noise = source, noise
        self.planted: dict[str, set[str]] = defaultdict(set)  # kind of noise → residents with it
        # (name, birth date) as rendered → the resident's key ("child:12", "mother:12", ...).
        self.rendered: dict[tuple[str, str], str] = {}
        self.collisions: set[tuple[str, str]] = set()

    def child(self, index: int, **kw: Any) -> Child:
        c = super().child(index, **kw)
        mother = self._render(c.mother, f"mother:{index}", adult=True) if c.mother else None
        father = self._render(c.father, f"father:{index}", adult=True) if c.father else None
        child = self._render(c, f"child:{index}", adult=False)
        return dataclasses.replace(child, mother=mother, father=father)  # type: ignore[type-var]

    def _render(self, person: Resident, key: str, *, adult: bool) -> Any:
        rng = random.Random(f"{self.seed}|{self.source}|{key}")
        changes: dict[str, Any] = {}
        if rng.random() < self.noise.name_typo:
            typo = _homophone_typo(person.name, rng)
            if typo != person.name:
                changes["name"] = typo
                self.planted["name-typo"].add(key)
        if rng.random() < self.noise.phone_change:
            changes["phone"] = "139" + f"{rng.randint(0, 99_999_999):08d}"
            self.planted["phone-change"].add(key)
        if not adult and rng.random() < self.noise.child_without_id:
            changes["id_number"] = ""
            self.planted["child-without-id"].add(key)
        rendered = dataclasses.replace(person, **changes) if changes else person
        seen = (rendered.name, rendered.birth_date.isoformat())
        if self.rendered.get(seen, key) != key:
            self.collisions.add(seen)
        self.rendered[seen] = key
        return rendered


def _homophone_typo(name: str, rng: random.Random) -> str:
    """Replace one given-name character (never the family name) by a homophone, if any has one."""
    family_len = 2 if len(name) >= 4 else 1
    positions = [i for i in range(family_len, len(name)) if name[i] in HOMOPHONES]
    if not positions:
        return name
    i = rng.choice(positions)
    return name[:i] + HOMOPHONES[name[i]] + name[i + 1 :]


class Scenario:
    """The shared population and one :class:`SourceView` per source system."""

    DEFAULT_NOISE = {
        "immunization": Noise(name_typo=0.04, phone_change=0.10),  # its own feed already lacks some IDs
        "mch": Noise(name_typo=0.04, phone_change=0.10, child_without_id=0.30),
        "emr": Noise(name_typo=0.04, phone_change=0.15),  # hospitals register by ID card (实名制)
    }

    def __init__(self, seed: int = 7, noise: dict[str, Noise] | None = None) -> None:
        self.base = Population(seed)
        self.views = {source: SourceView(self.base, source, n) for source, n in (noise or self.DEFAULT_NOISE).items()}

    def view(self, source: str) -> SourceView:
        return self.views[source]

    def resident_of(self, name: str, birth_date: str) -> str | None:
        """Who a stored source Patient (by its name text and birth date) really is; None if no
        source rendered anyone so (or two residents rendered the same)."""
        found = {v.rendered.get((name, birth_date)) for v in self.views.values()} - {None}
        if len(found) != 1 or any((name, birth_date) in v.collisions for v in self.views.values()):
            return None
        return found.pop()


@dataclasses.dataclass
class LinkQuality:
    """Golden records against the planted truth. A pair of source Patients is *found* when they
    share a golden and *true* when they render the same resident; a source still in review is
    linked to nothing."""

    sources: int
    residents: int
    goldens: int
    in_review: int
    found_pairs: int
    true_pairs: int
    correct_pairs: int
    unknown: list[str]  # source Patients no view rendered (should be none)
    split_residents: int  # residents whose linked sources are in more than one golden
    shared_goldens: int  # goldens holding sources of more than one resident

    @property
    def precision(self) -> float:
        return self.correct_pairs / self.found_pairs if self.found_pairs else 1.0

    @property
    def recall(self) -> float:
        return self.correct_pairs / self.true_pairs if self.true_pairs else 1.0


def link_quality(scenario: Scenario, sources: dict[str, dict[str, Any]], goldens: dict[str, dict[str, Any]]) -> LinkQuality:
    """Measure ``goldens`` (active golden Patients by id) over ``sources`` (source Patients by id)."""
    from itertools import combinations

    from fhir_server.mpi import golden as g

    who: dict[str, str] = {}
    unknown = []
    for pid, patient in sources.items():
        name = ((patient.get("name") or [{}])[0] or {}).get("text", "")
        resident = scenario.resident_of(name, patient.get("birthDate", ""))
        if resident is None:
            unknown.append(pid)
        else:
            who[pid] = resident
    golden_of: dict[str, str] = {}
    for gid, golden in goldens.items():
        for sid in g.source_ids(golden):
            golden_of[sid] = gid
    by_golden: dict[str, list[str]] = defaultdict(list)
    by_resident: dict[str, list[str]] = defaultdict(list)
    for pid, resident in who.items():
        by_resident[resident].append(pid)
        if pid in golden_of:
            by_golden[golden_of[pid]].append(pid)

    def pairs(groups: dict[str, list[str]]) -> set[tuple[str, str]]:
        return {(a, b) if a < b else (b, a) for members in groups.values() for a, b in combinations(members, 2)}

    found, true = pairs(by_golden), pairs(by_resident)
    return LinkQuality(
        sources=len(sources),
        residents=len(by_resident),
        goldens=len(goldens),
        in_review=sum(1 for pid in sources if pid not in golden_of),
        found_pairs=len(found),
        true_pairs=len(true),
        correct_pairs=len(found & true),
        unknown=unknown,
        split_residents=sum(1 for m in by_resident.values() if len({golden_of[p] for p in m if p in golden_of}) > 1),
        shared_goldens=sum(1 for m in by_golden.values() if len({who[p] for p in m}) > 1),
    )
