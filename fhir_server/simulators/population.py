"""Seeded synthetic Shanghai residents, shared by every simulated source.

The same seed gives the same people, so different sources (immunization, EMR, 妇幼) can describe
one resident and the MPI can be measured against the planted truth. ID numbers follow GB 11643
(division + birth date + sequence with the sex digit + MOD 11-2 check character).
"""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass

from fhir_server.validation.cn_identity import check_character

# GB/T 2260 codes of Shanghai's 16 districts, with a few real roads of each.
DISTRICTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "310101": ("黄浦区", ("南京东路", "淮海中路", "西藏南路", "复兴东路")),
    "310104": ("徐汇区", ("漕溪北路", "天钥桥路", "肇嘉浜路", "龙华中路")),
    "310105": ("长宁区", ("长宁路", "天山路", "仙霞路", "虹桥路")),
    "310106": ("静安区", ("南京西路", "延平路", "共和新路", "万荣路")),
    "310107": ("普陀区", ("曹杨路", "真北路", "武宁路", "铜川路")),
    "310109": ("虹口区", ("四川北路", "曲阳路", "大连西路", "东江湾路")),
    "310110": ("杨浦区", ("国权路", "五角场路", "控江路", "黄兴路")),
    "310112": ("闵行区", ("莘庄路", "七莘路", "都市路", "虹梅南路")),
    "310113": ("宝山区", ("牡丹江路", "友谊路", "共和新路", "淞宝路")),
    "310114": ("嘉定区", ("城中路", "博乐路", "塔城路", "清河路")),
    "310115": ("浦东新区", ("张杨路", "世纪大道", "东方路", "川沙路")),
    "310116": ("金山区", ("卫零路", "石化一村路", "朱泾路", "亭林路")),
    "310117": ("松江区", ("中山中路", "荣乐东路", "人民北路", "文诚路")),
    "310118": ("青浦区", ("公园路", "城中北路", "淀山湖大道", "华新路")),
    "310120": ("奉贤区", ("南桥路", "解放东路", "环城北路", "望园路")),
    "310151": ("崇明区", ("城桥镇八一路", "鼓浪屿路", "翠竹路", "东门路")),
}
SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗郑梁谢宋唐许韩冯邓曹彭曾肖田董潘袁蔡蒋余于杜叶程魏苏吕丁任沈姚卢姜崔钟谭陆汪范金石廖贾夏韦方白邹孟熊秦邱江尹薛段雷侯龙史陶黎贺顾毛郝龚邵万钱严武戴莫孔汤"
)
COMPOUND = ("欧阳", "司马", "诸葛", "上官")
GIVEN_M = "浩宇轩然子睿泽博文俊豪明杰晨辰昊天宸铭逸航嘉乐宇恒"
GIVEN_F = "欣怡梓涵诗雨桐思语嘉琪佳悦可馨一诺若曦婉清芷晴梦瑶"
GIVEN_ADULT_M = "伟强磊军勇杰涛斌超明刚平辉鹏华飞"
GIVEN_ADULT_F = "芳娜敏静丽艳娟霞燕玲红琴洁慧颖萍"


@dataclass(frozen=True)
class Resident:
    name: str
    sex: str  # GB/T 2261.1: 1 male, 2 female
    birth_date: _dt.date
    id_number: str
    district: str  # GB/T 2260 code of the household registration
    address: str
    phone: str

    @property
    def district_name(self) -> str:
        return DISTRICTS[self.district][0]


@dataclass(frozen=True)
class Child(Resident):
    mother: Resident | None = None
    father: Resident | None = None
    residence_district: str = ""
    residence_address: str = ""


def id_number(division: str, birth: _dt.date, sequence: int, sex: str) -> str:
    """A GB 11643 number: the sequence's last digit is odd for men, even for women."""
    seq = sequence % 1000
    if (seq % 2 == 1) != (sex == "1"):
        seq = (seq + 1) % 1000
    first17 = f"{division}{birth:%Y%m%d}{seq:03d}"
    return first17 + check_character(first17)


class Population:
    """Deterministic residents: ``Population(seed).child(i)`` is always the same child."""

    def __init__(self, seed: int = 20240601, reference: _dt.date = _dt.date(2025, 6, 30)) -> None:
        self.seed = seed
        self.reference = reference

    def _rng(self, *key: object) -> random.Random:
        return random.Random(f"{self.seed}|{'|'.join(map(str, key))}")

    def _name(self, rng: random.Random, sex: str, child: bool, family: str | None = None) -> str:
        family = family or (rng.choice(COMPOUND) if rng.random() < 0.01 else rng.choice(SURNAMES))
        pool = (GIVEN_M if sex == "1" else GIVEN_F) if child else (GIVEN_ADULT_M if sex == "1" else GIVEN_ADULT_F)
        given = "".join(rng.choice(pool) for _ in range(rng.choice((1, 2, 2))))
        return family + given

    def _address(self, rng: random.Random, district: str) -> str:
        name, roads = DISTRICTS[district]
        return f"上海市{name}{rng.choice(roads)}{rng.randint(1, 999)}弄{rng.randint(1, 60)}号{rng.randint(1, 30)}0{rng.randint(1, 4)}室"

    def _phone(self, rng: random.Random) -> str:
        return rng.choice(("13", "15", "18", "17")) + f"{rng.randint(0, 999_999_999):09d}"

    def adult(self, key: str, sex: str, age_years: int, district: str, address: str, phone: str, family: str | None = None) -> Resident:
        rng = self._rng("adult", key)
        birth = self.reference - _dt.timedelta(days=int(age_years * 365.25) + rng.randint(0, 364))
        return Resident(self._name(rng, sex, False, family), sex, birth, id_number(district, birth, rng.randint(0, 999), sex), district, address, phone)

    def child(self, index: int, *, min_age_days: int = 30, max_age_days: int = 6 * 365) -> Child:
        """Child ``index``: born within six years before the reference date, with both parents."""
        rng = self._rng("child", index)
        district = rng.choice(list(DISTRICTS))
        address = self._address(rng, district)
        phone = self._phone(rng)
        sex = rng.choice("12")
        birth = self.reference - _dt.timedelta(days=rng.randint(min_age_days, max_age_days))
        father = self.adult(f"{index}/f", "1", rng.randint(26, 40), district, address, phone)
        mother = self.adult(f"{index}/m", "2", rng.randint(24, 38), district, address, phone)
        family = father.name[:2] if father.name[:2] in COMPOUND else father.name[:1]
        moved = rng.random() < 0.2
        residence = rng.choice(list(DISTRICTS)) if moved else district
        return Child(
            name=self._name(rng, sex, True, family),
            sex=sex,
            birth_date=birth,
            id_number=id_number(district, birth, index * 2 + 1, sex),
            district=district,
            address=address,
            phone=phone,
            mother=mother,
            father=father,
            residence_district=residence,
            residence_address=self._address(rng, residence) if moved else address,
        )
