"""Study configs: the YAML schema, ``--set`` overrides, variants and cell names."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields
from importlib.resources import files
from pathlib import Path

import yaml

from ..engine.selection import SelectionConfig
from ..engine.train import check_train_values
from ..errors import UserError
from ..methods import METHODS, get_method, make_options, option_fields

CONFIG_DIR = Path(str(files("ssprompt").joinpath("configs")))  # package data
TOP_KEYS = {"name", "tasks", "seeds", "shots", "n_test", "test_from", "train", "selection",
            "variants", "comparisons", "primary", "equivalence_margin"}
# keys that only say how cells are reported, not what a cell computes: a finished study's
# cells stay valid when they change (the runner compares the rest with its stored config)
REPORT_KEYS = ("comparisons", "primary", "equivalence_margin")
SELECTION_KEYS = {f.name for f in fields(SelectionConfig)}
# a variant's own keys; the rest are its method's options (``ssprompt.methods``: the method
# ``kind:`` or ``method:`` names, e.g. kind weighted: learners, n_prompts, init, weight_shape,
# weight_init, anchored), each defaulting to its options dataclass
VARIANT_KEYS = {"name", "kind", "method", "role", "group", "train", "shots"}
# The variant kinds a study row can be: what is learned and how it is fused (see README,
# Glossary). ``zero_shot`` is the encoder's own prompts, nothing learned.
FIXED_KINDS = ("zero_shot", "prompt_engineering")  # variants with nothing to learn (uses_shots)
ROLES = ("baseline", "full")  # the row every Δ is taken against; the full-SSPrompt row
RENAMED = {"mode": "kind", "weight": "weight_shape"}  # old variant keys -> names since round 3
# A cell whose kept prompts score this many points below the baseline row (same task and seed)
# on mIoU, AP50 or PQ is listed as a loss in summary.md and announced at the end of a study.
LARGE_LOSS = 5.0


@dataclass
class Variant:
    name: str
    prompt: object              # the method's options (methods.options; PromptConfig)
    group: str = "main"
    train: dict = field(default_factory=dict)
    shots: int | None = None    # None: the study's
    base: str = ""              # the config's variant name (before a shots sweep's suffix)
    kind: str = "weighted"      # the method's name (methods.METHODS; kind = method)
    role: str | None = None     # one of ROLES, or None

    @property
    def fixed(self) -> bool:
        """Nothing to learn: one evaluation serves every seed."""
        return not get_method(self.kind).uses_shots


@dataclass
class StudyConfig:
    name: str
    tasks: list[str]
    seeds: list[int]
    shots: int
    n_test: int | None
    train: dict
    variants: list[Variant]
    raw: dict
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    comparisons: list[tuple[str, str]] = field(default_factory=list)
    # the primary family (named in advance; Holm-adjusted together over every task and
    # metric): pairs [a, b] read as a - b, where b may be a's own baseline (a's Δ to zero-shot)
    primary: list[tuple[str, str]] = field(default_factory=list)
    equivalence_margin: float | None = None   # points; TOST at this margin, fixed in advance
    test_from: int = 0          # scene tasks: the test split's first scene index (fresh scenes)

    def cell_config(self) -> dict:
        """What the cells compute, as parsed (every default filled in, each variant's method
        options resolved): two configs that differ only in how they are written or reported
        (``REPORT_KEYS``, comments, a default written out) give the same dict."""
        from dataclasses import asdict

        from ..prompts.promptset import config_dict

        return {"tasks": self.tasks, "seeds": self.seeds, "n_test": self.n_test,
                "test_from": self.test_from, "train": self.train,
                "selection": asdict(self.selection),
                "variants": [{"name": v.name, "options": config_dict(v.prompt),
                              "train": v.train, "shots": self.shots_of(v)}
                             for v in self.variants]}

    def shots_of(self, v: Variant) -> int:
        return v.shots if v.shots is not None else self.shots

    def cells(self) -> list[tuple[Variant, str, int]]:
        return [(v, t, s) for t in self.tasks for v in self.variants for s in self.seeds]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    @property
    def baseline(self) -> str:
        """The row marked ``role: baseline`` (zero-shot at the default N)."""
        return next(v.name for v in self.variants if v.role == "baseline")

    @property
    def full(self) -> str | None:
        """The row marked ``role: full`` (full SSPrompt), at the study's own number of shots
        where a shots sweep has several; None if no row has that role."""
        rows = [v for v in self.variants if v.role == "full"]
        return next((v.name for v in rows if self.shots_of(v) == self.shots),
                    rows[0].name if rows else None)

    def baseline_of(self, name: str) -> str | None:
        """What ``name``'s Δ is taken against: the zero-shot row with the same spatial-prompt
        grid (same N), so that an N row's Δ is what learning adds at N, not what the grid
        changes; the study's baseline where no such row exists. A zero-shot row at another N
        is compared with the baseline (that Δ is the grid's own effect). None for the
        baseline itself."""
        v = self.variant(name)
        if v.name == self.baseline:
            return None
        if v.kind != "zero_shot":
            same = [z.name for z in self.variants if z.kind == "zero_shot"
                    and z.prompt.n_prompts == v.prompt.n_prompts]
            if same:
                return self.baseline if self.baseline in same else same[0]
        return self.baseline


def _check_keys(where: str, got: dict, allowed: set[str]) -> None:
    bad = sorted(set(got) - allowed)
    if bad:
        raise UserError(f"{where}: unknown key(s) {', '.join(bad)}; allowed: "
                        f"{', '.join(sorted(allowed))}")


def parse_sets(items: list[str] | None) -> dict:
    """``--set key=value`` arguments -> {key: value}, each value parsed as YAML (``50``,
    ``0.01``, ``[0, 1]``, ``true``, ``weighted``)."""
    out = {}
    for item in items or []:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set {item}: expected key=value (e.g. --set train.steps=50)")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"--set {item}: value is not valid YAML "
                            f"({str(e).splitlines()[0]})") from None
    return out


def apply_sets(raw: dict, sets: dict) -> dict:
    """``raw`` with the ``--set`` overrides applied: a dotted key walks into mappings, and
    ``variants.NAME.key`` into the variant called NAME (``--set variants.ssprompt.n_prompts=25``).
    Unknown keys are caught by the config's own checks."""
    raw = copy.deepcopy(raw)
    for key, value in sets.items():
        node, parts = raw, key.split(".")
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[:i + 1])
            if isinstance(node, list):  # variants: by name
                hit = [v for v in node if isinstance(v, dict) and v.get("name") == part]
                if not hit:
                    raise UserError(f"--set {key}: no variant named {part!r}")
                node = hit[0]
            elif isinstance(node, dict):
                if node.get(part) is None and part != "variants":
                    node[part] = {}
                node = node[part]
            else:
                raise UserError(f"--set {key}: {where} is not a mapping")
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {'.'.join(parts[:-1])} is not a mapping")
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, sets: dict | None = None) -> StudyConfig:
    """A study config from YAML, with ``--set`` overrides (``parse_sets``) applied."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: study config not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a study config must be a mapping")
    if sets:
        raw = apply_sets(raw, sets)
        path = Path(f"{path} (with --set {', '.join(sets)})")
    _check_keys(str(path), raw, TOP_KEYS)
    for key in ("tasks", "seeds", "variants"):
        if not raw.get(key):
            raise UserError(f"{path}: '{key}' must be a non-empty list")
    train = check_train_values(f"{path}: train", dict(raw.get("train") or {}))
    selection = dict(raw.get("selection") or {})
    _check_keys(f"{path}: selection", selection, SELECTION_KEYS)
    variants, names = [], set()
    for i, v in enumerate(raw["variants"]):
        where = f"{path}: variants[{i}]"
        if not isinstance(v, dict):
            raise UserError(f"{where}: each variant must be a mapping with a name and a kind")
        for old, new in RENAMED.items():
            if old in v:
                hint = (f" (one of {', '.join(METHODS)}; 'default' is now 'zero_shot')"
                        if old == "mode" else "")
                raise UserError(f"{where}: '{old}' is now called '{new}'{hint}")
        if "kind" in v and "method" in v and v["kind"] != v["method"]:
            raise UserError(f"{where}: kind {v['kind']!r} and method {v['method']!r}: name "
                            "the method once")
        kind = v.get("method", v.get("kind"))
        if "name" not in v or kind is None:
            raise UserError(f"{where}: each variant needs a name and a kind (or method)")
        if kind not in METHODS:
            raise UserError(f"{where}: kind {kind!r} is unknown; choose one of "
                            f"{', '.join(METHODS)}")
        own = option_fields(kind)
        _check_keys(where, v, VARIANT_KEYS | set(own))
        if v.get("role") not in (None, *ROLES):
            raise UserError(f"{where}: role {v['role']!r} is unknown; choose one of "
                            f"{', '.join(ROLES)}")
        vtrain = check_train_values(f"{where}.train", v.get("train") or {})
        if v["name"] in names:
            raise UserError(f"{where}: duplicate variant name {v['name']!r}")
        names.add(v["name"])
        try:
            prompt = make_options(kind, {k: v[k] for k in own if k in v})
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        vshots = v.get("shots")
        if vshots is not None and (not isinstance(vshots, int) or vshots <= 0):
            raise UserError(f"{where}: shots must be a positive integer")
        variants.append(Variant(v["name"], prompt, v.get("group", "main"), vtrain, vshots,
                                v["name"], kind, v.get("role")))
    shots = raw.get("shots", 16)
    sweep = shots if isinstance(shots, list) else None
    if sweep is not None:  # a shots sweep: each learned variant once per k ("NAME-kK")
        if not sweep or any(not isinstance(k, int) or k <= 0 for k in sweep):
            raise UserError(f"{path}: shots must be a positive integer or a list of them")
        variants = [v for v in variants if v.fixed] + [
            Variant(f"{v.name}-k{k}", v.prompt, v.group, v.train, k, v.name, v.kind, v.role)
            for v in variants if not v.fixed for k in sweep]
        shots = max(sweep)
    elif not isinstance(shots, int) or shots <= 0:
        raise UserError(f"{path}: shots must be a positive integer or a list of them")
    for role in ROLES:
        marked = {v.base for v in variants if v.role == role}
        if len(marked) > 1:
            raise UserError(f"{path}: role {role} is given to {len(marked)} variants "
                            f"({', '.join(sorted(marked))}); give it to one")
    baseline = [v for v in variants if v.role == "baseline"]
    if not baseline or baseline[0].kind != "zero_shot":
        raise UserError(f"{path}: mark the zero-shot row every difference is taken against "
                        "with 'role: baseline' (a variant of kind zero_shot)")
    names = {v.name for v in variants}
    pairs = {}
    for key in ("comparisons", "primary"):
        pairs[key] = []
        for i, pair in enumerate(raw.get(key) or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(x in names for x in pair)):
                raise UserError(f"{path}: {key}[{i}]: expected [variant, variant] of this "
                                f"study's variants, got {pair!r}")
            pairs[key].append((pair[0], pair[1]))
    margin = raw.get("equivalence_margin")
    if margin is not None and (not isinstance(margin, (int, float)) or margin <= 0):
        raise UserError(f"{path}: equivalence_margin must be a positive number of points")
    test_from = raw.get("test_from", 0)
    if not isinstance(test_from, int) or test_from < 0:
        raise UserError(f"{path}: test_from must be a non-negative scene index")
    return StudyConfig(raw.get("name", path.stem), list(raw["tasks"]), list(raw["seeds"]),
                       shots, raw.get("n_test"), train, variants, raw,
                       SelectionConfig(**selection), pairs["comparisons"], pairs["primary"],
                       None if margin is None else float(margin), test_from)


def cell_id(variant: Variant, task: str, seed: int) -> str:
    return f"{variant.name}__{task}__s{seed}"
